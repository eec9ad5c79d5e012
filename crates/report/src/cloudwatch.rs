//! `--source cloudwatch`: the gateway's JSON log lines read back from a
//! CloudWatch Logs group with `FilterLogEvents` over the report's UTC days,
//! then fed to the same [`crate::build`] as files, so both sources give the
//! same numbers (Logs Insights' `pct()` is approximate; the HDR histograms
//! here are not). For ad-hoc questions, `queries/cloudwatch/*.query` are the
//! equivalent Logs Insights queries.

use anyhow::Context;
use aws_sdk_cloudwatchlogs::Client;
use aws_sdk_cloudwatchlogs::error::DisplayErrorContext;

/// An HTTPS client on rustls with ring, the one crypto provider of this
/// workspace (the SDK's default would add aws-lc).
pub fn http_client() -> aws_sdk_cloudwatchlogs::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// A client from the usual AWS chain: `AWS_REGION`, credentials from the
/// environment, profile or instance role, `AWS_ENDPOINT_URL` if set.
pub async fn client_from_environment() -> Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http_client())
        .load()
        .await;
    Client::new(&config)
}

/// Every event of `group` in `[start_ms, end_ms)`, one message per line.
pub async fn fetch_lines(
    client: &Client,
    group: &str,
    (start_ms, end_ms): (i64, i64),
) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let page = client
            .filter_log_events()
            .log_group_name(group)
            .start_time(start_ms)
            .end_time(end_ms - 1)
            .set_next_token(next.clone())
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}", DisplayErrorContext(&e)))
            .with_context(|| format!("cannot read CloudWatch Logs group {group}"))?;
        for event in page.events() {
            if let Some(message) = event.message() {
                out.extend_from_slice(message.trim_end().as_bytes());
                out.push(b'\n');
            }
        }
        match page.next_token() {
            // A repeated token on an empty page is the end of the stream too.
            Some(t) if !(page.events().is_empty() && next.as_deref() == Some(t)) => {
                next = Some(t.to_string())
            }
            _ => break,
        }
    }
    Ok(out)
}
