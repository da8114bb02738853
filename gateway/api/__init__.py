"""The HTTP surface: routes, authentication, input validation, limits and errors."""
