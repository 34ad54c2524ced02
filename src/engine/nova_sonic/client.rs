//! The Bedrock Runtime client: region and credentials from the standard AWS
//! chain (or given), and optionally another endpoint (a VPC endpoint, a
//! proxy, a compatible test server) trusted through a PEM file.

use std::path::PathBuf;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::config::Credentials;
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore, rustls_provider::CryptoMode};

/// Where and as whom to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// AWS Region, e.g. `us-east-1`; empty takes the chain's (`AWS_REGION`, profile).
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
    #[error("no AWS Region: set nova_sonic.region or AWS_REGION")]
    NoRegion,
}

/// Builds the client (reads the AWS config files and environment; call once
/// per engine and share it: it pools HTTP/2 connections).
pub async fn connect(settings: &ClientSettings) -> Result<Client, ClientError> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if !settings.region.is_empty() {
        loader = loader.region(Region::new(settings.region.clone()));
    }
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
    if shared.region().is_none() {
        return Err(ClientError::NoRegion);
    }
    Ok(Client::new(&shared))
}
