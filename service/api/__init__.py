"""HTTP routes, one router per resource, mounted under `/api/v1` by `service.app`."""
