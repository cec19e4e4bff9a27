//! Where objects are stored: an S3 bucket, or a local directory (for a laptop, or a file
//! system another tool uploads from). Both replace an object written again under its name,
//! whole: a reader sees the old object or the new one, never a mix.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use kcl_core::async_trait;

use super::ArchiveError;

/// One stored object, as a listing shows it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StoredObject {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A place for the archive's objects.
#[async_trait]
pub trait ObjectStore: std::fmt::Debug + Send + Sync + 'static {
    /// Stores `body` under `key`, replacing any object of that name.
    async fn put(&self, key: &str, body: Bytes) -> Result<(), ArchiveError>;
    /// Every object whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<StoredObject>, ArchiveError>;
    /// The object's content.
    async fn get(&self, key: &str) -> Result<Bytes, ArchiveError>;
    /// Where the objects go, for the logs: `s3://BUCKET` or the directory.
    fn location(&self) -> String;
}

/// Objects as files under a directory, the key's `/` as directory separators.
#[derive(Clone, Debug)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// A store under `root`, created when missing.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DirStore { root: root.into() }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn io_error(
        &self,
        operation: &'static str,
        path: &Path,
        source: std::io::Error,
    ) -> ArchiveError {
        ArchiveError::Store {
            operation,
            location: path.display().to_string(),
            transient: false,
            source: source.into(),
        }
    }
}

#[async_trait]
impl ObjectStore for DirStore {
    async fn put(&self, key: &str, body: Bytes) -> Result<(), ArchiveError> {
        let path = self.path(key);
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| self.io_error("creating the directory", dir, e))?;
        }
        // Written aside, synced, then renamed over the name: an object is there whole or not.
        let temporary = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
        let write = async {
            let mut file = tokio::fs::File::create(&temporary).await?;
            tokio::io::AsyncWriteExt::write_all(&mut file, &body).await?;
            file.sync_all().await?;
            tokio::fs::rename(&temporary, &path).await
        };
        if let Err(e) = write.await {
            let _ = tokio::fs::remove_file(&temporary).await;
            return Err(self.io_error("writing", &path, e));
        }
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<StoredObject>, ArchiveError> {
        let mut objects = Vec::new();
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir == self.root => {
                    return Ok(objects);
                }
                Err(e) => return Err(self.io_error("listing", &dir, e)),
            };
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(|e| self.io_error("listing", &dir, e))?
            {
                let path = entry.path();
                let metadata = entry
                    .metadata()
                    .await
                    .map_err(|e| self.io_error("reading the metadata of", &path, e))?;
                if metadata.is_dir() {
                    pending.push(path);
                    continue;
                }
                let Ok(relative) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let key = relative
                    .to_string_lossy()
                    .replace(std::path::MAIN_SEPARATOR, "/");
                // Files being written (`*.tmp-UUID`) are not objects yet.
                if key.starts_with(prefix) && key.ends_with(".gz") {
                    objects.push(StoredObject {
                        key,
                        size: metadata.len(),
                    });
                }
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn get(&self, key: &str) -> Result<Bytes, ArchiveError> {
        let path = self.path(key);
        tokio::fs::read(&path)
            .await
            .map(Bytes::from)
            .map_err(|e| self.io_error("reading", &path, e))
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

/// Objects in an S3 bucket.
#[derive(Clone, Debug)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
}

/// S3 error codes that no retry can fix: the request itself is wrong.
const PERMANENT_S3_ERRORS: [&str; 5] = [
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "InvalidBucketName",
    "SignatureDoesNotMatch",
];

impl S3Store {
    /// A store in `bucket`. `path_style` addresses the bucket in the path rather than the
    /// host name, as S3-compatible servers on one address need.
    pub fn new(sdk: &aws_config::SdkConfig, bucket: impl Into<String>, path_style: bool) -> Self {
        let config = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(path_style)
            .build();
        S3Store {
            client: aws_sdk_s3::Client::from_conf(config),
            bucket: bucket.into(),
        }
    }

    /// Creates the bucket; one that exists already (and is ours) is fine.
    pub async fn create_bucket(&self) -> Result<(), ArchiveError> {
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error().is_some_and(|e| {
                    e.is_bucket_already_owned_by_you() || e.is_bucket_already_exists()
                }) =>
            {
                Ok(())
            }
            Err(e) => Err(self.error("creating the bucket", self.location(), e)),
        }
    }

    /// Classifies an S3 failure: permanent when the service said the request is wrong,
    /// transient otherwise (throttling, 5xx, timeouts, a connection that failed).
    fn error<E>(
        &self,
        operation: &'static str,
        location: String,
        error: aws_sdk_s3::error::SdkError<E>,
    ) -> ArchiveError
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        use aws_sdk_s3::error::SdkError;
        let transient = match &error {
            SdkError::ServiceError(service) => !service
                .err()
                .code()
                .is_some_and(|code| PERMANENT_S3_ERRORS.contains(&code)),
            SdkError::ConstructionFailure(_) => false,
            _ => true,
        };
        ArchiveError::Store {
            operation,
            location,
            transient,
            // The SDK's own Display is terse ("service error"); its context names the code.
            source: aws_sdk_s3::error::DisplayErrorContext(error)
                .to_string()
                .into(),
        }
    }

    fn object(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, body: Bytes) -> Result<(), ArchiveError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/x-ndjson")
            .content_encoding("gzip")
            .body(body.into())
            .send()
            .await
            .map_err(|e| self.error("storing", self.object(key), e))?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<StoredObject>, ArchiveError> {
        let mut objects = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error("listing", self.object(prefix), e))?;
            for object in page.contents() {
                objects.push(StoredObject {
                    key: object.key().unwrap_or_default().to_owned(),
                    size: object
                        .size()
                        .unwrap_or_default()
                        .try_into()
                        .unwrap_or_default(),
                });
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn get(&self, key: &str) -> Result<Bytes, ArchiveError> {
        let object = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.error("reading", self.object(key), e))?;
        let body = object
            .body
            .collect()
            .await
            .map_err(|e| ArchiveError::Store {
                operation: "reading",
                location: self.object(key),
                transient: true,
                source: e.into(),
            })?;
        Ok(body.into_bytes())
    }

    fn location(&self) -> String {
        format!("s3://{}", self.bucket)
    }
}
