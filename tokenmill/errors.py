"""Every error a user can cause, in one hierarchy.

The server and the CLI map these to OpenAI-style JSON errors and exit codes in one place each, so a
new error only needs a class here (with its ``status_code``) to be reported correctly everywhere.

    TokenmillError                       500  base class; never raised directly
    ├── ConfigError                      400  a config field has a bad value (names field and value)
    ├── ModelLoadError                   400  the model cannot be loaded (names the file)
    │   ├── ModelNotFoundError                path missing, or a folder without weights
    │   ├── CorruptModelFileError             truncated / unreadable GGUF or safetensors
    │   └── UnsupportedModelError             architecture or tensor type tokenmill cannot run
    ├── InvalidRequestError              400  something in a request is wrong (``param`` names it)
    │   ├── InvalidSamplingParamsError        a sampling parameter is out of range / unknown
    │   ├── PromptTooLongError                prompt (+ max_tokens) over the context or the KV pool
    │   ├── UnknownModelError                the request names a model that is not served
    │   └── ContentFilterError               a gateway guardrail blocked the request (names the rule)
    ├── AuthenticationError              401  missing or wrong API key (never says which keys exist)
    ├── PermissionDeniedError            403  the tenant may not use this model
    ├── NotFoundError                    404  a named thing (e.g. a RAG collection) does not exist
    ├── RequestTooLargeError             413  the request body is over the configured limit
    ├── UpstreamUnavailableError         503  the gateway found no upstream able to answer
    ├── SharedStateUnavailableError      503  the gateway's Redis does not answer (fail-closed)
    ├── RequestRejectedError             429  the server is overloaded (queue bound); retry later
    ├── SlowReaderError                  408  a client left too much of its stream unread
    ├── EngineNotReadyError              503  the engine is starting or shutting down
    ├── EngineDeadError                  503  the engine core died; the server restarts it or exits
    │   └── WorkerFailedError                 a model worker died, raised, or stopped answering
    └── BenchError                       -    a measuring-tool problem (unreachable URL, bad input)
"""

from __future__ import annotations


class TokenmillError(Exception):
    """Base class: carries an HTTP status and an OpenAI error ``type`` for the server's handler."""

    status_code: int = 500
    error_type: str = "internal_error"
    request_id: str | None = None
    """The response id a request got before it failed (sent as ``x-request-id``), if any."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ConfigError(TokenmillError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelLoadError(TokenmillError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(ModelLoadError):
    pass


class CorruptModelFileError(ModelLoadError):
    pass


class UnsupportedModelError(ModelLoadError):
    pass


class InvalidRequestError(TokenmillError):
    status_code = 400
    error_type = "invalid_request_error"


class InvalidSamplingParamsError(InvalidRequestError):
    pass


class PromptTooLongError(InvalidRequestError):
    pass


class UnknownModelError(InvalidRequestError):
    error_type = "model_not_found"


class ContentFilterError(InvalidRequestError):
    def __init__(self, message: str, *, code: str | None = "content_filter", **kwargs):
        super().__init__(message, code=code, **kwargs)


class AuthenticationError(TokenmillError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(TokenmillError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(TokenmillError):
    status_code = 404
    error_type = "not_found_error"


class RequestTooLargeError(TokenmillError):
    status_code = 413
    error_type = "invalid_request_error"


class UpstreamUnavailableError(TokenmillError):
    status_code = 503
    error_type = "service_unavailable"


class SharedStateUnavailableError(TokenmillError):
    status_code = 503
    error_type = "service_unavailable"


class RequestRejectedError(TokenmillError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_seconds: float = 1.0, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after_seconds = retry_after_seconds


class EngineNotReadyError(TokenmillError):
    status_code = 503
    error_type = "service_unavailable"


class SlowReaderError(TokenmillError):
    status_code = 408
    error_type = "timeout_error"


class EngineDeadError(TokenmillError):
    status_code = 503
    error_type = "service_unavailable"


class WorkerFailedError(EngineDeadError):
    """A model worker (a rank of the executor) died, raised inside a step, or did not answer in
    time; the message names the rank, its pid and what happened."""


class BenchError(TokenmillError):
    """A problem in the measuring tools (unreachable server, bad workload spec, ...)."""
