//! DynamoDB SDK errors onto the core's [`Error`] variants.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use kcl_core::{AwsSdkError, Error, Service};

pub(crate) fn build_error(
    operation: &'static str,
    e: aws_sdk_dynamodb::error::BuildError,
) -> Error {
    Error::Service {
        service: Service::LeaseStore,
        operation,
        source: e.into(),
    }
}

/// The one place where DynamoDB SDK errors are mapped onto [`Error`] variants. (A failed
/// condition is recognised where the lease is known, in [`DynamoLeaseStore::update_lease`].)
pub(crate) fn classify<E>(table: &str, operation: &'static str, err: SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let service = Service::LeaseStore;
    let status = match &err {
        SdkError::ServiceError(e) => Some(e.raw().status().as_u16()),
        _ => None,
    };
    match (&err, err.code()) {
        (
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_),
            _,
        ) => Error::Transient {
            service,
            operation,
            source: AwsSdkError::new(err).into(),
        },
        (_, Some("ResourceNotFoundException")) => Error::LeaseTableNotFound {
            table: table.to_owned(),
            source: Some(AwsSdkError::new(err).into()),
        },
        (
            _,
            Some(
                "ProvisionedThroughputExceededException"
                | "RequestLimitExceeded"
                | "ThrottlingException"
                | "LimitExceededException",
            ),
        ) => Error::Throttled {
            service,
            operation,
            source: AwsSdkError::new(err).into(),
        },
        (
            _,
            Some("InternalServerError" | "ServiceUnavailable" | "TransactionConflictException"),
        ) => Error::Transient {
            service,
            operation,
            source: AwsSdkError::new(err).into(),
        },
        _ if status.is_some_and(|s| s >= 500) => Error::Transient {
            service,
            operation,
            source: AwsSdkError::new(err).into(),
        },
        _ => Error::Service {
            service,
            operation,
            source: AwsSdkError::new(err).into(),
        },
    }
}
