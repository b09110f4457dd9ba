"""Built-in routers run by the workers: ``responder`` and ``proxy``."""
