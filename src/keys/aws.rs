//! The AWS KMS key provider, on aws-sdk-kms.
//!
//! Credentials and region come from the standard chain (`AWS_PROFILE`, `AWS_REGION`, instance
//! roles, ...) and the endpoint from the standard override `AWS_ENDPOINT_URL_KMS`, so the same
//! binary talks to AWS and to a local KMS-compatible server. A key ARN names its own region and
//! gets a client for that region, which is how a multi-region volume reaches each region's
//! replica; `KMSFS_KMS_ENDPOINTS=region=url,...` points a region at its own endpoint (a VPC
//! endpoint, or a test server).
//!
//! The SDK's own retries are off: the keyring retries every provider the same way, with
//! jittered backoff under a deadline. Each attempt has a timeout here. `Decrypt` always names
//! the key (`KeyId`) and the answer must name the same key and carry exactly 32 bytes. The
//! calls block on a small runtime owned by the provider; callers are plain threads (FUSE
//! workers, command-line code), never async tasks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use aws_sdk_kms::Client;
use zeroize::Zeroize;

use super::{KeyError, KeyErrorKind, KeyProvider, KmsOp};
use crate::format::context::EncryptionContext;
use crate::format::envelope::WrappedKey;
use crate::secret::DataKey;

/// How kmsfs reaches AWS KMS beyond the standard environment.
#[derive(Debug, Clone)]
pub struct AwsOptions {
    /// Longest wait for one HTTP attempt.
    pub attempt_timeout: Duration,
    /// Per-region endpoint overrides (`KMSFS_KMS_ENDPOINTS`); they win over
    /// `AWS_ENDPOINT_URL_KMS` for their region.
    pub endpoints: BTreeMap<String, String>,
}

impl Default for AwsOptions {
    fn default() -> Self {
        AwsOptions {
            attempt_timeout: Duration::from_secs(5),
            endpoints: BTreeMap::new(),
        }
    }
}

impl AwsOptions {
    /// Defaults plus `KMSFS_KMS_ENDPOINTS` and `KMSFS_KMS_ATTEMPT_TIMEOUT_MS` from the
    /// environment.
    pub fn from_env() -> Result<Self, String> {
        let mut opts = AwsOptions::default();
        if let Ok(list) = std::env::var("KMSFS_KMS_ENDPOINTS") {
            for item in list.split(',').filter(|s| !s.trim().is_empty()) {
                let (region, url) = item.trim().split_once('=').ok_or_else(|| {
                    format!("bad KMSFS_KMS_ENDPOINTS entry '{item}': expected REGION=URL")
                })?;
                opts.endpoints.insert(region.to_string(), url.to_string());
            }
        }
        if let Ok(ms) = std::env::var("KMSFS_KMS_ATTEMPT_TIMEOUT_MS") {
            let ms: u64 = ms.parse().map_err(|_| {
                format!("bad KMSFS_KMS_ATTEMPT_TIMEOUT_MS '{ms}': expected milliseconds")
            })?;
            opts.attempt_timeout = Duration::from_millis(ms.max(1));
        }
        Ok(opts)
    }
}

pub struct AwsKmsProvider {
    runtime: tokio::runtime::Runtime,
    sdk: aws_config::SdkConfig,
    options: AwsOptions,
    clients: Mutex<HashMap<String, Client>>,
}

/// The region named by a key or alias ARN (`arn:aws:kms:REGION:ACCOUNT:key/ID`).
pub fn region_of(key_id: &str) -> Option<&str> {
    let mut parts = key_id.split(':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("arn"), Some(_partition), Some("kms"), Some(region)) if !region.is_empty() => {
            Some(region)
        }
        _ => None,
    }
}

fn context_map(ctx: &EncryptionContext) -> HashMap<String, String> {
    ctx.pairs()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Maps an SDK failure to the kinds operators act on, naming the call, key and context keys.
fn map_err<E>(
    op: KmsOp,
    key_id: &str,
    ctx: Option<&EncryptionContext>,
    err: SdkError<E, HttpResponse>,
) -> KeyError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    use KeyErrorKind::*;
    let (kind, detail) = match &err {
        SdkError::TimeoutError(_) => (Timeout, "no answer within the attempt timeout".to_string()),
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            (Timeout, "no answer within the attempt timeout".to_string())
        }
        SdkError::DispatchFailure(_) => (
            Unavailable,
            format!("cannot reach the KMS endpoint: {}", root_cause(&err)),
        ),
        SdkError::ResponseError(_) => (
            Unavailable,
            format!("unreadable answer: {}", root_cause(&err)),
        ),
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = err.code().unwrap_or("");
            let message = err.message().unwrap_or("");
            let kind = match code {
                "ThrottlingException" | "RequestLimitExceeded" | "TooManyRequestsException" => {
                    Throttled
                }
                "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "ExpiredTokenException"
                | "MissingAuthenticationTokenException" => AccessDenied,
                "InvalidCiphertextException" => ContextMismatch,
                "IncorrectKeyException" => IncorrectKey,
                "DisabledException" | "KMSInvalidStateException" => KeyDisabled,
                "NotFoundException" => NotFound,
                "DependencyTimeoutException" => Timeout,
                "KeyUnavailableException" | "KMSInternalException" => Unavailable,
                _ if status == 429 => Throttled,
                _ if status >= 500 => Unavailable,
                _ => InvalidResponse,
            };
            let mut detail = if code.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("{code}: {message}")
            };
            if let (AccessDenied, Some(ctx)) = (kind, ctx) {
                let keys: Vec<&str> = ctx.pairs().keys().map(String::as_str).collect();
                detail.push_str(&format!("; context keys: {}", keys.join(", ")));
            }
            (kind, detail)
        }
        _ => (InvalidResponse, root_cause(&err)),
    };
    KeyError::new(kind, op, key_id, detail)
}

/// The innermost error's message: what actually went wrong ("Connection refused"), without
/// the layers of wrapper types the SDK's own rendering shows.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    // The deepest cause with a message of its own.
    let mut text = String::new();
    let mut cause = Some(err);
    while let Some(e) = cause {
        let own = e.to_string();
        if !own.is_empty() {
            text = own;
        }
        cause = e.source();
    }
    if text.is_empty() {
        DisplayErrorContext(err).to_string()
    } else {
        text
    }
}

fn take_key(op: KmsOp, key_id: &str, blob: Option<Blob>) -> Result<DataKey, KeyError> {
    let mut bytes = blob
        .ok_or_else(|| {
            KeyError::new(
                KeyErrorKind::InvalidResponse,
                op,
                key_id,
                "no plaintext in the answer",
            )
        })?
        .into_inner();
    let key = DataKey::from_slice(&bytes);
    let len = bytes.len();
    bytes.zeroize();
    key.ok_or_else(|| {
        KeyError::new(
            KeyErrorKind::InvalidResponse,
            op,
            key_id,
            format!("the data key is {len} bytes, not 32"),
        )
    })
}

fn take_blob(op: KmsOp, key_id: &str, blob: Option<Blob>) -> Result<WrappedKey, KeyError> {
    let blob = blob
        .ok_or_else(|| {
            KeyError::new(
                KeyErrorKind::InvalidResponse,
                op,
                key_id,
                "no ciphertext in the answer",
            )
        })?
        .into_inner();
    let wrapped = WrappedKey {
        key_id: key_id.to_string(),
        blob,
    };
    wrapped
        .validate()
        .map_err(|e| KeyError::new(KeyErrorKind::InvalidResponse, op, key_id, e))?;
    Ok(wrapped)
}

/// The key an answer names must be the key asked for (when we asked by ARN).
fn check_key(op: KmsOp, asked: &str, answered: Option<&str>) -> Result<(), KeyError> {
    match answered {
        Some(a) if asked.starts_with("arn:") && a != asked => Err(KeyError::new(
            KeyErrorKind::IncorrectKey,
            op,
            asked,
            format!("KMS answered with key {a}"),
        )),
        _ => Ok(()),
    }
}

impl AwsKmsProvider {
    /// Loads the standard AWS configuration. Fails only if the runtime cannot start.
    pub fn new(options: AwsOptions) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kmsfs-kms")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the AWS client runtime: {e}"))?;
        let sdk =
            runtime.block_on(aws_config::defaults(aws_config::BehaviorVersion::latest()).load());
        Ok(AwsKmsProvider {
            runtime,
            sdk,
            options,
            clients: Mutex::new(HashMap::new()),
        })
    }

    fn client(&self, op: KmsOp, key_id: &str) -> Result<Client, KeyError> {
        let region = region_of(key_id)
            .map(str::to_string)
            .or_else(|| self.sdk.region().map(|r| r.to_string()))
            .ok_or_else(|| {
                KeyError::new(
                    KeyErrorKind::NotFound,
                    op,
                    key_id,
                    "no AWS region: set AWS_REGION or name the key by its ARN",
                )
            })?;
        let mut clients = self.clients.lock().unwrap();
        if let Some(c) = clients.get(&region) {
            return Ok(c.clone());
        }
        let timeouts = aws_sdk_kms::config::timeout::TimeoutConfig::builder()
            .connect_timeout(self.options.attempt_timeout)
            .operation_attempt_timeout(self.options.attempt_timeout)
            .build();
        let mut config = aws_sdk_kms::config::Builder::from(&self.sdk)
            .region(aws_sdk_kms::config::Region::new(region.clone()))
            .retry_config(aws_sdk_kms::config::retry::RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(url) = self.options.endpoints.get(&region) {
            config = config.endpoint_url(url);
        }
        let client = Client::from_conf(config.build());
        clients.insert(region, client.clone());
        Ok(client)
    }

    /// Runs one request to completion on the provider's runtime, mapping its failure.
    fn send<T, E>(
        &self,
        op: KmsOp,
        key_id: &str,
        ctx: Option<&EncryptionContext>,
        request: impl std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    ) -> Result<T, KeyError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        self.runtime
            .block_on(request)
            .map_err(|e| map_err(op, key_id, ctx, e))
    }

    /// The ARN of a key named by id, alias or ARN (DescribeKey), refusing keys that cannot
    /// encrypt (disabled or pending deletion).
    pub fn describe(&self, key: &str) -> Result<String, KeyError> {
        let op = KmsOp::DescribeKey;
        let client = self.client(op, key)?;
        let out = self.send(op, key, None, client.describe_key().key_id(key).send())?;
        let meta = out.key_metadata().ok_or_else(|| {
            KeyError::new(KeyErrorKind::InvalidResponse, op, key, "no key metadata")
        })?;
        if !meta.enabled() {
            return Err(KeyError::new(
                KeyErrorKind::KeyDisabled,
                op,
                key,
                format!("key state {:?}", meta.key_state()),
            ));
        }
        meta.arn()
            .map(str::to_string)
            .ok_or_else(|| KeyError::new(KeyErrorKind::InvalidResponse, op, key, "no key ARN"))
    }
}

impl KeyProvider for AwsKmsProvider {
    fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, WrappedKey), KeyError> {
        let op = KmsOp::GenerateDataKey;
        let client = self.client(op, key_id)?;
        let request = client
            .generate_data_key()
            .key_id(key_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(context_map(ctx)))
            .send();
        let out = self.send(op, key_id, Some(ctx), request)?;
        check_key(op, key_id, out.key_id())?;
        let mut out = out;
        let dek = take_key(op, key_id, out.plaintext.take())?;
        let wrapped = take_blob(op, key_id, out.ciphertext_blob.take())?;
        Ok((dek, wrapped))
    }

    fn encrypt(
        &self,
        key_id: &str,
        key: &DataKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError> {
        let op = KmsOp::Encrypt;
        let client = self.client(op, key_id)?;
        let request = client
            .encrypt()
            .key_id(key_id)
            .plaintext(Blob::new(key.expose().to_vec()))
            .set_encryption_context(Some(context_map(ctx)))
            .send();
        let mut out = self.send(op, key_id, Some(ctx), request)?;
        check_key(op, key_id, out.key_id())?;
        take_blob(op, key_id, out.ciphertext_blob.take())
    }

    fn decrypt(&self, wrapped: &WrappedKey, ctx: &EncryptionContext) -> Result<DataKey, KeyError> {
        let op = KmsOp::Decrypt;
        let key_id = wrapped.key_id.as_str();
        let client = self.client(op, key_id)?;
        let request = client
            .decrypt()
            .key_id(key_id)
            .ciphertext_blob(Blob::new(wrapped.blob.clone()))
            .set_encryption_context(Some(context_map(ctx)))
            .send();
        let mut out = self.send(op, key_id, Some(ctx), request)?;
        check_key(op, key_id, out.key_id())?;
        take_key(op, key_id, out.plaintext.take())
    }

    fn re_encrypt(
        &self,
        wrapped: &WrappedKey,
        from_ctx: &EncryptionContext,
        to_key_id: &str,
        to_ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError> {
        let op = KmsOp::ReEncrypt;
        let key_id = wrapped.key_id.as_str();
        let client = self.client(op, to_key_id)?;
        let request = client
            .re_encrypt()
            .ciphertext_blob(Blob::new(wrapped.blob.clone()))
            .source_key_id(key_id)
            .set_source_encryption_context(Some(context_map(from_ctx)))
            .destination_key_id(to_key_id)
            .set_destination_encryption_context(Some(context_map(to_ctx)))
            .send();
        let mut out = self.send(op, key_id, Some(from_ctx), request)?;
        check_key(op, to_key_id, out.key_id())?;
        take_blob(op, to_key_id, out.ciphertext_blob.take())
    }

    /// KMS re-encrypts between keys of one region; across regions the key must pass through
    /// a Decrypt and an Encrypt.
    fn can_re_encrypt(&self, from_key: &str, to_key: &str) -> bool {
        region_of(from_key).is_some() && region_of(from_key) == region_of(to_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_come_from_arns() {
        assert_eq!(
            region_of("arn:aws:kms:eu-west-1:111122223333:key/abc"),
            Some("eu-west-1")
        );
        assert_eq!(
            region_of("arn:aws-us-gov:kms:us-gov-west-1:1:alias/x"),
            Some("us-gov-west-1")
        );
        assert_eq!(region_of("alias/x"), None);
        assert_eq!(region_of("1234abcd-12ab-34cd-56ef-1234567890ab"), None);
    }
}
