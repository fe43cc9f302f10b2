//! The HTTP side: sends a stored batch's exact bytes under its key and reads the answer through
//! a size cap. Knows nothing of the database.
//!
//! Security: HTTPS only (plain HTTP is allowed to a loopback address, for the simulator), no
//! redirects followed (reqwest would forward `x-api-key` to another host), the key marked
//! sensitive on every request.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use tracing::{info, warn};

use crate::classify::{self, Answer, Exchange, TransportFailure};
use crate::fleet::{TeamGate, Turn as FleetTurn};
use crate::model::{ObjectType, Operation};
use crate::settings::HttpSettings;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("micro.base_url {0:?} is not a URL")]
    BadUrl(String),
    #[error(
        "micro.base_url {0:?} must be https:// (plain http:// is allowed only to a loopback address such as the simulator)"
    )]
    Insecure(String),
    #[error("micro.team_id is not set (MICRO_TEAM_ID)")]
    NoTeam,
    #[error("the API key is not set (MICRO_API_KEY or micro.api_key_file)")]
    NoKey,
    #[error("the API key holds characters an HTTP header cannot carry")]
    BadKey,
    #[error("building the HTTP client: {0}")]
    Build(#[from] reqwest::Error),
}

/// A client-wide gate: a server-requested pause (429) and the optional request-rate ceiling
/// apply to every batch in flight, not only the one that was told to slow down.
#[derive(Debug, Default)]
struct Gate {
    paused_until: Option<Instant>,
    next_slot: Option<Instant>,
}

#[derive(Debug)]
pub struct MicroClient {
    http: reqwest::Client,
    base_url: String,
    team_id: String,
    api_key: std::sync::RwLock<SecretString>,
    /// Where the key was read from, when it came from a file: read again while the API refuses
    /// the key ([`MicroClient::reload_key`]), so that a rotated Kubernetes Secret is taken up
    /// without a restart.
    key_file: Option<std::path::PathBuf>,
    max_response_bytes: usize,
    max_retry_after: Duration,
    min_interval: Option<Duration>,
    max_requests_per_second: f64,
    gate: Mutex<Gate>,
    /// In a daemon: the team's fleet-wide ceiling and pause, shared through the database
    /// (`fleet.rs`); they replace this client's own rate ceiling.
    fleet: Option<Arc<TeamGate>>,
}

impl MicroClient {
    pub fn new(
        base_url: &str,
        team_id: &str,
        api_key: Option<SecretString>,
        http: &HttpSettings,
    ) -> Result<MicroClient, ClientError> {
        let url =
            reqwest::Url::parse(base_url).map_err(|_| ClientError::BadUrl(base_url.into()))?;
        let loopback = match url.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        };
        match url.scheme() {
            "https" => {}
            "http" if loopback => {}
            _ => return Err(ClientError::Insecure(base_url.into())),
        }
        if team_id.trim().is_empty() {
            return Err(ClientError::NoTeam);
        }
        let api_key = api_key
            .filter(|k| !k.expose_secret().is_empty())
            .ok_or(ClientError::NoKey)?;
        HeaderValue::from_str(api_key.expose_secret()).map_err(|_| ClientError::BadKey)?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(http.timeout)
            .connect_timeout(http.connect_timeout)
            .user_agent(concat!("prism-sync/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let min_interval = (http.max_requests_per_second > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / http.max_requests_per_second));
        Ok(MicroClient {
            http: client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            team_id: team_id.to_owned(),
            api_key: std::sync::RwLock::new(api_key),
            key_file: None,
            max_response_bytes: http.max_response_bytes,
            max_retry_after: http.max_retry_after,
            min_interval,
            max_requests_per_second: http.max_requests_per_second,
            gate: Mutex::new(Gate::default()),
            fleet: None,
        })
    }

    pub fn endpoint(&self, object_type: ObjectType, operation: Operation) -> String {
        format!(
            "{}/v2/prism/{}/{}/batch/{}",
            self.base_url,
            path_segment(&self.team_id),
            object_type,
            operation
        )
    }

    /// The team this client sends for.
    pub fn team_id(&self) -> &str {
        &self.team_id
    }

    /// The configured request ceiling (0: none).
    pub fn max_requests_per_second(&self) -> f64 {
        self.max_requests_per_second
    }

    /// Shares this team's request ceiling and 429 pauses with every replica through `gate`.
    pub fn join_fleet(&mut self, gate: Arc<TeamGate>) {
        self.fleet = Some(gate);
    }

    /// Caps a server-requested delay.
    pub fn cap_delay(&self, d: Duration) -> Duration {
        d.min(self.max_retry_after)
    }

    /// Holds every send back until `until` (a 429 or a `retry-after` anywhere).
    pub fn slow_down(&self, delay: Duration) {
        let delay = self.cap_delay(delay);
        let until = Instant::now() + delay;
        {
            let mut gate = self.gate.lock().expect("gate lock");
            if gate.paused_until.is_none_or(|p| p < until) {
                gate.paused_until = Some(until);
            }
        }
        if let Some(fleet) = &self.fleet {
            fleet.share_pause(delay);
        }
    }

    /// Whether a server-requested pause (429, `retry-after`), this replica's or another's, is
    /// holding sends back right now.
    pub fn is_paused(&self) -> bool {
        let gate = self.gate.lock().expect("gate lock");
        gate.paused_until.is_some_and(|p| p > Instant::now())
            || self
                .fleet
                .as_ref()
                .is_some_and(|f| f.paused_for().is_some())
    }

    /// Waits for this replica's own pause, then for a send slot of the fleet.
    async fn wait_fleet_turn(&self, fleet: &TeamGate) {
        loop {
            let own = self
                .gate
                .lock()
                .expect("gate lock")
                .paused_until
                .and_then(|p| p.checked_duration_since(Instant::now()));
            if let Some(d) = own {
                tokio::time::sleep(d).await;
                continue;
            }
            match fleet.take_turn().await {
                FleetTurn::Go => return,
                FleetTurn::Wait(d) => tokio::time::sleep(d).await,
            }
        }
    }

    /// Waits for the shared pause and the rate ceiling, then reserves this request's slot: call
    /// it right before [`MicroClient::send_to`], which does not wait.
    pub async fn wait_turn(&self) {
        enum Turn {
            Paused(Duration),
            At(Instant),
        }
        if let Some(fleet) = &self.fleet {
            return self.wait_fleet_turn(fleet).await;
        }
        loop {
            let turn = {
                let mut gate = self.gate.lock().expect("gate lock");
                let now = Instant::now();
                match gate.paused_until {
                    Some(p) if p > now => Turn::Paused(p - now),
                    _ => {
                        gate.paused_until = None;
                        let slot = match self.min_interval {
                            None => now,
                            Some(step) => {
                                let slot = gate.next_slot.map_or(now, |s| s.max(now));
                                gate.next_slot = Some(slot + step);
                                slot
                            }
                        };
                        Turn::At(slot)
                    }
                }
            };
            match turn {
                // Re-check after a pause: another 429 may have extended it meanwhile.
                Turn::Paused(d) => tokio::time::sleep(d).await,
                Turn::At(slot) => {
                    tokio::time::sleep_until(slot.into()).await;
                    return;
                }
            }
        }
    }

    /// [`MicroClient::wait_turn`], then [`MicroClient::send_to`] for `batch/update`.
    pub async fn send(
        &self,
        object_type: ObjectType,
        idempotency_key: &str,
        body: Bytes,
    ) -> Exchange {
        self.wait_turn().await;
        self.send_to(object_type, Operation::Update, idempotency_key, body)
            .await
    }

    /// Reads the key again from the file it came from (`micro.api_key_file`, a team's
    /// `api_key_file`) and uses it from the next request on, when it changed: called while the
    /// API refuses the key, so that a key rotated in a Kubernetes Secret (its mounted file
    /// changes in place) is taken up by the next probe, without a restart. `true` when the key
    /// changed. A file that cannot be read, or holds no usable key, leaves the key as it is.
    pub fn reload_key(&self) -> bool {
        let Some(path) = &self.key_file else {
            return false;
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                warn!(team = %self.team_id, path = %path.display(), error = %e, "cannot read the API key file again; keeping the key in use");
                return false;
            }
        };
        let fresh = text.trim();
        if fresh.is_empty() || HeaderValue::from_str(fresh).is_err() {
            warn!(team = %self.team_id, path = %path.display(), "the API key file holds no usable key; keeping the key in use");
            return false;
        }
        let mut key = self.api_key.write().expect("api key lock");
        if key.expose_secret() == fresh {
            return false;
        }
        *key = SecretString::from(fresh.to_owned());
        info!(team = %self.team_id, path = %path.display(), "the API key file changed: using the new key");
        true
    }

    /// Remembers that the key came from `path` (see [`MicroClient::reload_key`]).
    pub fn with_key_file(mut self, path: Option<&std::path::Path>) -> Self {
        self.key_file = path.map(std::path::Path::to_owned);
        self
    }

    /// Sends the stored bytes once to `batch/update` or `batch/delete`, at once: the caller
    /// waited its turn ([`MicroClient::wait_turn`]) and checked what else must hold it back
    /// (an operator's pause). Never retries by itself: the caller records the outcome durably
    /// first, then decides.
    pub async fn send_to(
        &self,
        object_type: ObjectType,
        operation: Operation,
        idempotency_key: &str,
        body: Bytes,
    ) -> Exchange {
        let mut key =
            match HeaderValue::from_str(self.api_key.read().expect("api key lock").expose_secret())
            {
                Ok(k) => k,
                Err(_) => {
                    return Exchange::Failed {
                        kind: TransportFailure::Connect,
                        detail: "unusable API key".into(),
                    };
                }
            };
        key.set_sensitive(true);
        let started = Instant::now();
        let request = self
            .http
            .post(self.endpoint(object_type, operation))
            .header("x-api-key", key)
            .header("idempotency-key", idempotency_key)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        let result = match request.send().await {
            Ok(response) => self.read(response).await,
            Err(e) => Exchange::Failed {
                kind: failure_kind(&e),
                detail: error_chain(&e),
            },
        };
        let class = match &result {
            Exchange::Answered(a) => match a.status {
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            },
            Exchange::Unreadable { .. } => "2xx",
            Exchange::Failed { .. } => "error",
        };
        metrics::counter!("prism_sync_http_requests_total", "status_class" => class).increment(1);
        metrics::histogram!("prism_sync_http_request_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn read(&self, mut response: reqwest::Response) -> Exchange {
        let status = response.status().as_u16();
        let headers = response.headers();
        let retry_after = classify::retry_after(headers, SystemTime::now());
        let should_retry = classify::should_retry(headers);
        let replay = headers
            .get("idempotent-replay")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        // A 2xx whose body cannot be read still means the request was applied.
        let failed = |kind: TransportFailure, detail: String| {
            if (200..300).contains(&status) {
                Exchange::Unreadable {
                    status,
                    kind,
                    detail,
                }
            } else {
                Exchange::Failed { kind, detail }
            }
        };
        if let Some(len) = response.content_length()
            && len > self.max_response_bytes as u64
        {
            return failed(
                TransportFailure::ResponseTooLarge,
                format!("response announces {len} bytes, over http.max_response_bytes"),
            );
        }
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.max_response_bytes {
                        return failed(
                            TransportFailure::ResponseTooLarge,
                            format!(
                                "response body over http.max_response_bytes ({})",
                                self.max_response_bytes
                            ),
                        );
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return failed(failure_kind(&e), error_chain(&e)),
            }
        }
        Exchange::Answered(Answer {
            status,
            retry_after,
            should_retry,
            replay,
            body,
        })
    }
}

fn failure_kind(e: &reqwest::Error) -> TransportFailure {
    if e.is_timeout() {
        TransportFailure::Timeout
    } else if e.is_connect() {
        TransportFailure::Connect
    } else {
        TransportFailure::Interrupted
    }
}

/// reqwest's top-level message hides the cause ("error sending request"); operators need it.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `text` as one URL path segment: every byte but RFC 3986's unreserved characters is
/// percent-encoded, so a team id holding `/`, `?`, `#`, `%` or a space cannot change the path.
/// (`.` and `..` alone are refused as team ids by the settings: URL parsers resolve them.)
fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(url: &str) -> Result<MicroClient, ClientError> {
        MicroClient::new(
            url,
            "team",
            Some(SecretString::from("k")),
            &HttpSettings::default(),
        )
    }

    #[test]
    fn plain_http_is_refused_except_to_loopback() {
        assert!(matches!(
            client("http://api.example.com"),
            Err(ClientError::Insecure(_))
        ));
        assert!(client("http://127.0.0.1:8787").is_ok());
        assert!(client("http://[::1]:8787").is_ok());
        assert!(client("http://localhost:8787").is_ok());
        assert!(client("https://developers.micro.so").is_ok());
        assert!(matches!(client("ftp://x"), Err(ClientError::Insecure(_))));
    }

    #[test]
    fn the_endpoint_names_team_object_type_and_operation() {
        let c = client("https://developers.micro.so/").unwrap();
        assert_eq!(
            c.endpoint(ObjectType::Deal, Operation::Update),
            "https://developers.micro.so/v2/prism/team/deal/batch/update"
        );
        assert_eq!(
            c.endpoint(ObjectType::Contact, Operation::Delete),
            "https://developers.micro.so/v2/prism/team/contact/batch/delete"
        );
    }

    #[test]
    fn the_client_debug_output_hides_the_key() {
        let c = MicroClient::new(
            "https://x.io",
            "t",
            Some(SecretString::from("sekrit-123")),
            &HttpSettings::default(),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("sekrit-123"));
    }
}
