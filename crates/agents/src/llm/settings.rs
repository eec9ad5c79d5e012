//! Settings of the `llm` agent: environment first, then `init.settings`.

use std::time::Duration;

use serde_json::{Map, Value};

pub(crate) const ENV_BASE_URL: &str = "AISHELL_LLM_BASE_URL";
pub(crate) const ENV_MODEL: &str = "AISHELL_LLM_MODEL";
pub(crate) const ENV_API_KEY: &str = "AISHELL_LLM_API_KEY";

const DEFAULT_BASH_TIMEOUT: Duration = Duration::from_secs(120);
const DEFAULT_CONTEXT_CHARS: usize = 200_000;
/// Below this the guard could not even keep a system prompt and a question.
const MIN_CONTEXT_CHARS: usize = 1_000;

#[derive(Clone)]
pub(crate) struct Settings {
    /// e.g. `http://127.0.0.1:8080/v1`; requests go to `{base_url}/chat/completions`.
    pub(crate) base_url: Option<String>,
    pub(crate) model: Option<String>,
    pub(crate) api_key: Option<String>,
    /// Appended to the built-in prompt (and `AGENTS.md`).
    pub(crate) system_prompt: Option<String>,
    pub(crate) max_tokens: Option<u64>,
    /// Default timeout of one `bash` tool call.
    pub(crate) bash_timeout: Duration,
    /// Budget for the serialized messages of one request.
    pub(crate) context_chars: usize,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("max_tokens", &self.max_tokens)
            .field("bash_timeout", &self.bash_timeout)
            .field("context_chars", &self.context_chars)
            .finish()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            base_url: None,
            model: None,
            api_key: None,
            system_prompt: None,
            max_tokens: None,
            bash_timeout: DEFAULT_BASH_TIMEOUT,
            context_chars: DEFAULT_CONTEXT_CHARS,
        }
    }
}

fn non_empty(s: String) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

impl Settings {
    pub(crate) fn from_env() -> Self {
        let env = |k: &str| std::env::var(k).ok().and_then(non_empty);
        Settings {
            base_url: env(ENV_BASE_URL),
            model: env(ENV_MODEL),
            api_key: env(ENV_API_KEY),
            ..Settings::default()
        }
    }

    /// Apply `init.settings`; invalid values are reported on stderr and
    /// ignored.
    pub(crate) fn apply(&mut self, map: &Map<String, Value>) {
        let text = |k: &str| -> Option<Option<String>> {
            match map.get(k)? {
                Value::String(s) => Some(non_empty(s.clone())),
                Value::Null => Some(None),
                other => {
                    eprintln!("llm agent: ignoring setting {k}: expected a string, got {other}");
                    None
                }
            }
        };
        if let Some(v) = text("llm_base_url") {
            self.base_url = v;
        }
        if let Some(v) = text("llm_model") {
            self.model = v;
        }
        if let Some(v) = text("llm_api_key") {
            self.api_key = v;
        }
        if let Some(v) = text("system_prompt") {
            self.system_prompt = v;
        }
        if let Some(v) = map.get("max_tokens") {
            match v.as_u64() {
                Some(n) if n > 0 => self.max_tokens = Some(n),
                _ if v.is_null() => self.max_tokens = None,
                _ => eprintln!("llm agent: ignoring invalid max_tokens {v}"),
            }
        }
        if let Some(v) = map.get("bash_timeout_secs") {
            match v.as_f64() {
                Some(s) if s > 0.0 && s.is_finite() && s < 1e9 => {
                    self.bash_timeout = Duration::from_secs_f64(s);
                }
                _ => eprintln!("llm agent: ignoring invalid bash_timeout_secs {v}"),
            }
        }
        if let Some(v) = map.get("context_chars") {
            match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) => self.context_chars = n.max(MIN_CONTEXT_CHARS),
                None => eprintln!("llm agent: ignoring invalid context_chars {v}"),
            }
        }
    }

    /// `{base}/chat/completions`, or why there is none.
    pub(crate) fn endpoint(&self) -> Result<(String, String), String> {
        let base = self.base_url.as_deref().ok_or_else(|| {
            format!(
                "no model endpoint configured: set {ENV_BASE_URL} (e.g. http://127.0.0.1:8080/v1) \
                 or the agent setting llm_base_url"
            )
        })?;
        let model = self.model.clone().ok_or_else(|| {
            format!("no model configured: set {ENV_MODEL} or the agent setting llm_model")
        })?;
        let base = base.trim_end_matches('/');
        let url = if base.ends_with("/chat/completions") {
            base.to_string()
        } else {
            format!("{base}/chat/completions")
        };
        Ok((url, model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_override_and_validate() {
        let mut s = Settings::default();
        let map = serde_json::json!({
            "llm_base_url": "http://h:1/v1/",
            "llm_model": "m",
            "llm_api_key": "k",
            "max_tokens": 100,
            "bash_timeout_secs": 2.5,
            "context_chars": 5000,
        });
        s.apply(map.as_object().unwrap());
        assert_eq!(
            s.endpoint().unwrap(),
            (
                "http://h:1/v1/chat/completions".to_string(),
                "m".to_string()
            )
        );
        assert_eq!(s.api_key.as_deref(), Some("k"));
        assert_eq!(s.max_tokens, Some(100));
        assert_eq!(s.bash_timeout, Duration::from_millis(2500));
        assert_eq!(s.context_chars, 5000);
        assert!(!format!("{s:?}").contains("\"k\""));
        let bad = serde_json::json!({"max_tokens": "x", "bash_timeout_secs": -1, "llm_model": 3, "context_chars": 10});
        s.apply(bad.as_object().unwrap());
        assert_eq!(s.max_tokens, Some(100));
        assert_eq!(s.bash_timeout, Duration::from_millis(2500));
        assert_eq!(s.model.as_deref(), Some("m"));
        assert_eq!(s.context_chars, MIN_CONTEXT_CHARS);
        let unset = serde_json::json!({"llm_base_url": ""});
        s.apply(unset.as_object().unwrap());
        assert!(s.endpoint().unwrap_err().contains(ENV_BASE_URL));
    }
}
