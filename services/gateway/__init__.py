"""One base URL for the whole public API in the stack, as the Kubernetes ingress gives."""
