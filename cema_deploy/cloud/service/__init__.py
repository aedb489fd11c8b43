"""The cloud's serving process: ``api`` (the HTTP routes over an engine), ``openapi`` (the protocol header in the
OpenAPI document), ``lock`` (one writer per state), ``memory`` (the allocator settings that keep RSS in budget)."""
