"""The sipwire command line and its typed configuration."""
