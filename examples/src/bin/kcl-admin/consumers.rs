//! `consumers` and `deregister-consumer`: the enhanced fan-out consumers registered on a
//! stream. Workers register their consumer and never deregister it (another deploy of the
//! application may read as it); removing one is this explicit action.

use std::io::IsTerminal as _;

use aws_sdk_kinesis::error::ProvideErrorMetadata;
use kcl_core::AwsSdkError;
use serde::Serialize;

use crate::error::{AdminError, Result};
use crate::render::{Report, emit, rfc3339, table};

/// `deregister-consumer`.
#[derive(Debug, clap::Args)]
pub(crate) struct DeregisterArgs {
    /// The consumer's name on the stream (--stream).
    #[arg(long, conflicts_with = "arn", required_unless_present = "arn")]
    name: Option<String>,
    /// The consumer's ARN.
    #[arg(long)]
    arn: Option<String>,
    /// Deregister without asking (required when standard input is not a terminal).
    #[arg(long)]
    yes: bool,
    /// Print what would be deregistered, and do nothing.
    #[arg(long)]
    dry_run: bool,
}

/// One consumer (`--json`).
#[derive(Debug, Serialize)]
pub(crate) struct ConsumerLine {
    name: String,
    arn: String,
    status: String,
    /// RFC 3339.
    created: Option<String>,
}

/// The `consumers` output (`--json`).
#[derive(Debug, Serialize)]
pub(crate) struct ConsumersReport {
    stream: String,
    consumers: Vec<ConsumerLine>,
}

impl Report for ConsumersReport {
    fn text(&self) -> String {
        if self.consumers.is_empty() {
            return format!(
                "stream `{}` has no enhanced fan-out consumer\n",
                self.stream
            );
        }
        let rows: Vec<Vec<String>> = self
            .consumers
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.status.clone(),
                    c.created.clone().unwrap_or_default(),
                    c.arn.clone(),
                ]
            })
            .collect();
        table(&["CONSUMER", "STATUS", "CREATED", "ARN"], &rows)
    }
}

/// The `deregister-consumer` output (`--json`).
#[derive(Debug, Serialize)]
pub(crate) struct DeregisterReport {
    consumer: String,
    dry_run: bool,
    deregistered: bool,
}

impl Report for DeregisterReport {
    fn text(&self) -> String {
        if self.dry_run {
            format!("would deregister consumer `{}` (dry run)\n", self.consumer)
        } else {
            format!("deregistered consumer `{}`\n", self.consumer)
        }
    }
}

fn aws<E>(
    operation: &'static str,
    stream: &str,
    e: aws_sdk_kinesis::error::SdkError<E>,
) -> AdminError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if e.code() == Some("ResourceNotFoundException") {
        return AdminError::StreamMissing {
            stream: stream.to_owned(),
            source: Some(AwsSdkError::new(e).into()),
        };
    }
    AdminError::Aws {
        operation,
        source: AwsSdkError::new(e).into(),
    }
}

/// The stream's ARN (the consumer APIs take only ARNs).
async fn stream_arn(client: &aws_sdk_kinesis::Client, stream: &str) -> Result<String> {
    if stream.starts_with("arn:") {
        return Ok(stream.to_owned());
    }
    let out = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .map_err(|e| aws("DescribeStreamSummary", stream, e))?;
    Ok(out
        .stream_description_summary()
        .map(|s| s.stream_arn().to_owned())
        .unwrap_or_default())
}

/// `consumers`: every consumer registered on the stream.
pub(crate) async fn list(sdk: &aws_config::SdkConfig, stream: &str, json: bool) -> Result<()> {
    let client = aws_sdk_kinesis::Client::new(sdk);
    let arn = stream_arn(&client, stream).await?;
    let mut consumers = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let request = client.list_stream_consumers().stream_arn(&arn);
        let out = request
            .set_next_token(token.take())
            .send()
            .await
            .map_err(|e| aws("ListStreamConsumers", stream, e))?;
        for c in out.consumers() {
            consumers.push(ConsumerLine {
                name: c.consumer_name().to_owned(),
                arn: c.consumer_arn().to_owned(),
                status: c.consumer_status().as_str().to_owned(),
                created: std::time::SystemTime::try_from(*c.consumer_creation_timestamp())
                    .ok()
                    .map(rfc3339),
            });
        }
        token = out.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    consumers.sort_by(|a, b| a.name.cmp(&b.name));
    emit(
        &ConsumersReport {
            stream: stream.to_owned(),
            consumers,
        },
        json,
    )
}

/// `deregister-consumer`, after confirmation.
pub(crate) async fn deregister(
    sdk: &aws_config::SdkConfig,
    stream: Option<&str>,
    args: &DeregisterArgs,
    json: bool,
) -> Result<()> {
    let client = aws_sdk_kinesis::Client::new(sdk);
    let request = client.deregister_stream_consumer();
    let (request, consumer) = match (&args.arn, &args.name, stream) {
        (Some(arn), _, _) => (request.consumer_arn(arn), arn.clone()),
        (None, Some(name), Some(stream)) => (
            request
                .stream_arn(stream_arn(&client, stream).await?)
                .consumer_name(name),
            name.clone(),
        ),
        _ => {
            return Err(AdminError::StreamRequired {
                what: "deregister-consumer --name",
            });
        }
    };
    // The consumer must exist: a typo must not look like success.
    let describe = client.describe_stream_consumer();
    let describe = match (&args.arn, stream) {
        (Some(arn), _) => describe.consumer_arn(arn),
        (None, Some(stream)) => describe
            .stream_arn(stream_arn(&client, stream).await?)
            .consumer_name(&consumer),
        (None, None) => unreachable!("refused above"),
    };
    if let Err(e) = describe.send().await {
        return Err(if e.code() == Some("ResourceNotFoundException") {
            AdminError::ConsumerMissing {
                consumer,
                source: Some(AwsSdkError::new(e).into()),
            }
        } else {
            AdminError::Aws {
                operation: "DescribeStreamConsumer",
                source: AwsSdkError::new(e).into(),
            }
        });
    }
    if !args.dry_run {
        if !args.yes {
            return Err(AdminError::DeregistrationNotConfirmed {
                consumer,
                reason: if std::io::stdin().is_terminal() {
                    "deregistering a consumer stops every application reading as it: pass --yes"
                        .into()
                } else {
                    "standard input is not a terminal: pass --yes".into()
                },
            });
        }
        request
            .send()
            .await
            .map_err(|e| aws("DeregisterStreamConsumer", stream.unwrap_or(""), e))?;
    }
    emit(
        &DeregisterReport {
            consumer,
            dry_run: args.dry_run,
            deregistered: !args.dry_run,
        },
        json,
    )
}
