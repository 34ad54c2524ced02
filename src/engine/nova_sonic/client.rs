//! The Bedrock Runtime client: region and credentials from the standard AWS
//! chain (or given), and optionally another endpoint (a VPC endpoint, a
//! proxy, a compatible test server) trusted through a PEM file.
//!
//! The Region is `nova_sonic.region` when set; otherwise the AWS chain's
//! (`AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`, the
//! instance metadata service), and [`FALLBACK_REGION`] only when none has
//! one.

use std::path::PathBuf;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::config::Credentials;
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore, rustls_provider::CryptoMode};

/// Where and as whom to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// AWS Region, e.g. `us-east-1`; empty takes the chain's (see [`resolve_region`]).
    pub region: String,
    /// Endpoint URL replacing `https://bedrock-runtime.{region}.amazonaws.com`.
    pub endpoint_url: Option<String>,
    /// PEM certificates to trust instead of the system roots (for `endpoint_url`).
    pub ca_file: Option<PathBuf>,
    /// Fixed credentials instead of the standard chain (embedding, tests).
    pub credentials: Option<StaticCredentials>,
}

/// An access key pair, with an optional session token.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// Why no client could be built: the caller reports it and serves nothing.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("the CA file {path} holds no usable PEM certificate: {reason}")]
    BadCa { path: String, reason: String },
}

/// The Region used when neither the configuration nor the AWS chain names one.
pub const FALLBACK_REGION: &str = "us-east-1";

/// Where the Region in use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionSource {
    /// `nova_sonic.region` (or `--region`).
    Configured,
    /// The AWS chain: environment, profile or instance metadata.
    Chain,
    /// Nothing named one: [`FALLBACK_REGION`].
    Fallback,
}

impl RegionSource {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Configured => "nova_sonic.region",
            Self::Chain => "the AWS environment, profile or instance metadata",
            Self::Fallback => "the built-in default",
        }
    }
}

/// The Region to call: the configured one, else the AWS chain's, else
/// [`FALLBACK_REGION`].
pub async fn resolve_region(configured: &str) -> (Region, RegionSource) {
    let configured = configured.trim();
    if !configured.is_empty() {
        return (Region::new(configured.to_owned()), RegionSource::Configured);
    }
    let chain = aws_config::default_provider::region::DefaultRegionChain::builder().build();
    match chain.region().await {
        Some(region) => (region, RegionSource::Chain),
        None => (Region::from_static(FALLBACK_REGION), RegionSource::Fallback),
    }
}

/// A client and the Region it calls.
#[derive(Debug, Clone)]
pub(crate) struct Connected {
    pub(crate) client: Client,
    pub(crate) region: Region,
    pub(crate) region_source: RegionSource,
}

/// Builds the client (reads the AWS config files and environment; call once
/// per engine and share it: it pools HTTP/2 connections).
pub(crate) async fn connect(settings: &ClientSettings) -> Result<Connected, ClientError> {
    let (region, region_source) = resolve_region(&settings.region).await;
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(region.clone());
    if let Some(c) = &settings.credentials {
        loader = loader.credentials_provider(Credentials::new(
            c.access_key_id.clone(),
            c.secret_access_key.clone(),
            c.session_token.clone(),
            None,
            "sonora-static",
        ));
    }
    if let Some(path) = &settings.ca_file {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|e| ClientError::CaFile {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
            let reason = "no BEGIN CERTIFICATE block".to_owned();
            return Err(ClientError::BadCa {
                path: shown,
                reason,
            });
        }
        let trust = TrustStore::empty()
            .with_native_roots(false)
            .with_pem_certificate(pem);
        let context = TlsContext::builder()
            .with_trust_store(trust)
            .build()
            .map_err(|e| ClientError::BadCa {
                path: shown,
                reason: e.to_string(),
            })?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
            .tls_context(context)
            .build_https();
        loader = loader.http_client(http);
    }
    if let Some(url) = &settings.endpoint_url {
        loader = loader.endpoint_url(url.clone());
    }
    let shared = loader.load().await;
    Ok(Connected {
        client: Client::new(&shared),
        region,
        region_source,
    })
}
