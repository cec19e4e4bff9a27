//! [`AwsSdkError`]: an error of the AWS SDK, shown as what the service said.

use std::fmt;

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::RequestId as _;

use crate::error::BoxError;

/// An error of the AWS SDK, as the `source` of an [`Error`](crate::Error) from an AWS call
/// (Kinesis here, DynamoDB in `kcl-dynamo-lease`).
///
/// The SDK's own error displays only `service error` or `dispatch failure`. This one displays
/// what the reader of a log needs. For an answer of the service: its error code, message and
/// request id, e.g. `ResourceNotFoundException: Requested resource not found (request id
/// 7a3c...)`; there is no [`source`](std::error::Error::source) below that, since the SDK's
/// layers only repeat it. For a request without a usable answer (a refused connection, a
/// timeout, a response that does not parse): the SDK's failure, with its causes as the source,
/// so that [`ErrorChain`](crate::ErrorChain) shows e.g. `dispatch failure: io error: ...:
/// Connection refused (os error 111)`. The SDK's error itself is kept, see
/// [`AwsSdkError::sdk_error`].
#[derive(Debug)]
pub struct AwsSdkError {
    summary: String,
    code: Option<String>,
    /// The service answered with an error (`SdkError::ServiceError`).
    answered: bool,
    sdk: BoxError,
}

/// What an SDK error's raw answer says of its HTTP status: a response has one, an event
/// stream's message (an exception frame inside `SubscribeToShard`) has none.
pub trait RawAnswer: fmt::Debug + Send + Sync + 'static {
    /// The HTTP status, when there is one.
    fn http_status(&self) -> Option<u16>;
    /// The request id from the response headers, when there are headers.
    fn request_id(&self) -> Option<&str>;
}

impl RawAnswer for aws_sdk_kinesis::config::http::HttpResponse {
    fn http_status(&self) -> Option<u16> {
        Some(self.status().as_u16())
    }

    fn request_id(&self) -> Option<&str> {
        let headers = self.headers();
        headers
            .get("x-amzn-requestid")
            .or_else(|| headers.get("x-amz-request-id"))
    }
}

impl RawAnswer for aws_smithy_types::event_stream::RawMessage {
    fn http_status(&self) -> Option<u16> {
        None
    }

    fn request_id(&self) -> Option<&str> {
        None
    }
}

impl AwsSdkError {
    /// Wraps an error returned by an AWS SDK operation (or an event stream of one).
    pub fn new<E, R>(err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: RawAnswer,
    {
        // The request id is in the response headers; a modelled error also has it in its
        // metadata.
        let raw = match &err {
            SdkError::ServiceError(context) => Some(context.raw()),
            SdkError::ResponseError(context) => Some(context.raw()),
            _ => None,
        };
        let request_id = raw
            .and_then(RawAnswer::request_id)
            .or_else(|| err.meta().request_id())
            .map(str::to_owned);
        let code = err.code().map(str::to_owned);
        let (mut summary, answered) = match &err {
            SdkError::ServiceError(context) => {
                let mut summary = match (&code, err.message()) {
                    (Some(code), Some(message)) => format!("{code}: {message}"),
                    (Some(code), None) => code.clone(),
                    // No code to go by: the HTTP status is all there is.
                    (None, message) => format!(
                        "service error{}{}",
                        context
                            .raw()
                            .http_status()
                            .map_or_else(String::new, |s| format!(" (HTTP {s})")),
                        message.map_or_else(String::new, |m| format!(": {m}"))
                    ),
                };
                if summary.is_empty() {
                    summary.push_str("service error");
                }
                (summary, true)
            }
            other => (other.to_string(), false),
        };
        if let Some(id) = &request_id {
            summary.push_str(&format!(" (request id {id})"));
        }
        AwsSdkError {
            summary,
            code,
            answered,
            sdk: Box::new(err),
        }
    }

    /// The error code the service answered with (e.g. `ResourceNotFoundException`), if it
    /// answered.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// The SDK's error, to downcast to `SdkError<OperationError>` for anything not shown here.
    pub fn sdk_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.sdk.as_ref()
    }
}

impl fmt::Display for AwsSdkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary)
    }
}

impl std::error::Error for AwsSdkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        if self.answered {
            None
        } else {
            // Below the SDK's error, whose text is the summary already.
            self.sdk.source()
        }
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_kinesis::config::http::HttpResponse;
    use aws_sdk_kinesis::error::ErrorMetadata;
    use aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorError;
    use aws_sdk_kinesis::types::error::ResourceNotFoundException;
    use aws_smithy_types::body::SdkBody;

    use super::*;
    use crate::error::{Error, ErrorChain, Service};

    fn response(status: u16, request_id: Option<&str>) -> HttpResponse {
        let mut raw = HttpResponse::new(status.try_into().expect("status"), SdkBody::empty());
        if let Some(id) = request_id {
            raw.headers_mut().insert("x-amzn-RequestId", id.to_owned());
        }
        raw
    }

    #[test]
    fn a_service_error_shows_its_code_message_and_request_id() {
        // An error the SDK does not model (it displays as "unhandled error" only).
        let meta = ErrorMetadata::builder()
            .code("InvalidArgumentException")
            .message("Timestamp cannot be in the future")
            .build();
        let sdk = SdkError::service_error(
            GetShardIteratorError::generic(meta),
            response(400, Some("req-1234")),
        );
        let e = Error::Service {
            service: Service::Kinesis,
            operation: "GetShardIterator",
            source: AwsSdkError::new(sdk).into(),
        };
        assert_eq!(
            ErrorChain(&e).to_string(),
            "Kinesis GetShardIterator failed: InvalidArgumentException: Timestamp cannot be in \
             the future (request id req-1234)"
        );

        // A modelled error, its request id only in its metadata.
        let modelled = ResourceNotFoundException::builder()
            .message("Stream orders under account 0000 not found.")
            .meta(
                ErrorMetadata::builder()
                    .code("ResourceNotFoundException")
                    .message("Stream orders under account 0000 not found.")
                    .custom("aws_request_id", "req-5678")
                    .build(),
            )
            .build();
        let sdk = SdkError::service_error(
            GetShardIteratorError::ResourceNotFoundException(modelled),
            response(400, None),
        );
        let wrapped = AwsSdkError::new(sdk);
        assert_eq!(wrapped.code(), Some("ResourceNotFoundException"));
        assert_eq!(
            ErrorChain(&wrapped).to_string(),
            "ResourceNotFoundException: Stream orders under account 0000 not found. (request id \
             req-5678)"
        );
        assert!(
            wrapped
                .sdk_error()
                .downcast_ref::<SdkError<GetShardIteratorError>>()
                .is_some(),
            "the SDK's error is kept"
        );
    }

    #[test]
    fn a_service_error_without_a_code_shows_the_http_status() {
        let sdk = SdkError::service_error(
            GetShardIteratorError::generic(ErrorMetadata::builder().build()),
            response(503, None),
        );
        assert_eq!(
            AwsSdkError::new(sdk).to_string(),
            "service error (HTTP 503)"
        );
    }

    #[test]
    fn a_failure_without_an_answer_shows_its_causes() {
        let refused =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let sdk: SdkError<GetShardIteratorError> =
            SdkError::dispatch_failure(aws_sdk_kinesis::error::ConnectorError::io(refused.into()));
        let e = Error::Transient {
            service: Service::Kinesis,
            operation: "GetRecords",
            source: AwsSdkError::new(sdk).into(),
        };
        let text = ErrorChain(&e).to_string();
        assert!(
            text.starts_with("Kinesis GetRecords failed (transient): dispatch failure: "),
            "{text}"
        );
        assert!(text.ends_with("connection refused"), "{text}");
    }
}
