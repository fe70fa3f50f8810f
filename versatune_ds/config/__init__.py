"""The run configuration: schema (frozen dataclasses), loading (YAML + overrides), validation, identity."""
