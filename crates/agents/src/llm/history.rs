//! Conversation history of the `llm` agent: kept in memory, appended to
//! `.aishell/llm/{conversation_id}.jsonl` in the workspace (one OpenAI chat
//! message per line, the system prompt excluded: it is assembled afresh for
//! every request), and fitted into the context budget for each request.
//!
//! The request view ([`fit`]) never fails for length:
//!
//! 1. [`repair`]: every assistant tool call gets a `tool` answer (a stub
//!    when the turn was interrupted before the tool ran) and stray `tool`
//!    messages are dropped, so servers never see a malformed sequence;
//! 2. while over budget, the oldest tool outputs become `[trimmed N chars]`;
//! 3. then the oldest turns (a user message and everything up to the next
//!    one) are dropped, always keeping the latest user message's turn;
//! 4. then the longest remaining strings are cut in the middle.
//!
//! The file keeps everything; only the request is trimmed.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

/// Tool outputs at most this long are not worth trimming.
const STUB_THRESHOLD: usize = 200;
/// Upper bound on the cut-long-strings step (each pass halves one string).
const MAX_CUTS: usize = 256;

/// A conversation's file. Shared with the agent's input loop, which marks it
/// deleted so a turn still winding down cannot write it back.
pub(crate) struct Store {
    pub(crate) path: PathBuf,
    pub(crate) deleted: bool,
}

pub(crate) type SharedStore = Arc<Mutex<Store>>;

pub(crate) fn shared_store(path: PathBuf) -> SharedStore {
    Arc::new(Mutex::new(Store {
        path,
        deleted: false,
    }))
}

/// Read a history file; a missing file is an empty history, undecodable
/// lines are skipped (and reported).
pub(crate) fn load(path: &Path) -> std::io::Result<Vec<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(v) if v.get("role").and_then(Value::as_str).is_some() => out.push(v),
            _ => eprintln!(
                "llm agent: skipping undecodable line {} of {}",
                i + 1,
                path.display()
            ),
        }
    }
    Ok(out)
}

/// The messages of one conversation and where they are persisted.
pub(crate) struct History {
    pub(crate) messages: Vec<Value>,
    store: SharedStore,
}

impl History {
    pub(crate) fn new(messages: Vec<Value>, store: SharedStore) -> Self {
        History { messages, store }
    }

    /// Append one message (memory and file).
    pub(crate) fn push(&mut self, message: Value) {
        let store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        if !store.deleted {
            let result = (|| {
                if let Some(dir) = store.path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let mut line = serde_json::to_vec(&message).map_err(std::io::Error::other)?;
                line.push(b'\n');
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&store.path)?
                    .write_all(&line)
            })();
            if let Err(e) = result {
                eprintln!("llm agent: cannot append to {}: {e}", store.path.display());
            }
        }
        drop(store);
        self.messages.push(message);
    }

    /// Forget everything (memory and file).
    pub(crate) fn clear(&mut self) {
        self.messages.clear();
        let store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        match std::fs::remove_file(&store.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("llm agent: cannot remove {}: {e}", store.path.display()),
        }
    }
}

fn role(m: &Value) -> &str {
    m.get("role").and_then(Value::as_str).unwrap_or("")
}

fn tool_call_ids(m: &Value) -> Vec<String> {
    m.get("tool_calls")
        .and_then(Value::as_array)
        .map(|calls| {
            calls
                .iter()
                .filter_map(|c| c.get("id").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A `tool` message for a call that never got its result.
pub(crate) fn missing_result(id: &str) -> Value {
    json!({
        "role": "tool",
        "tool_call_id": id,
        "content": "[no result: the call was interrupted before it finished]",
    })
}

/// A well-formed copy of `history` (see the module docs).
pub(crate) fn repair(history: &[Value]) -> Vec<Value> {
    let mut out = Vec::with_capacity(history.len());
    let mut pending: Vec<String> = Vec::new();
    for m in history {
        if role(m) == "tool" {
            let id = m.get("tool_call_id").and_then(Value::as_str);
            if let Some(pos) = id.and_then(|id| pending.iter().position(|p| p == id)) {
                pending.remove(pos);
                out.push(m.clone());
            }
            continue;
        }
        out.extend(pending.drain(..).map(|id| missing_result(&id)));
        out.push(m.clone());
        if role(m) == "assistant" {
            pending = tool_call_ids(m);
        }
    }
    out.extend(pending.drain(..).map(|id| missing_result(&id)));
    out
}

fn size(v: &Value) -> usize {
    // Serialising a Value cannot fail; +1 for the separating comma.
    serde_json::to_string(v).map(|s| s.len()).unwrap_or(0) + 1
}

/// What [`fit`] had to do.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Trimmed {
    pub(crate) tool_outputs: usize,
    pub(crate) messages_dropped: usize,
    pub(crate) strings_cut: usize,
}

impl Trimmed {
    pub(crate) fn any(&self) -> bool {
        self.tool_outputs + self.messages_dropped + self.strings_cut > 0
    }
}

/// The messages of one request: the system prompt, then `history` repaired
/// and fitted into `limit` characters of serialized JSON.
pub(crate) fn fit(system: &str, history: &[Value], limit: usize) -> (Vec<Value>, Trimmed) {
    let mut report = Trimmed::default();
    let system = json!({"role": "system", "content": system});
    let mut msgs = repair(history);
    let mut total = size(&system) + msgs.iter().map(size).sum::<usize>();

    // 1. Oldest tool outputs first.
    for m in msgs.iter_mut() {
        if total <= limit {
            break;
        }
        if role(m) != "tool" {
            continue;
        }
        let Some(content) = m.get("content").and_then(Value::as_str) else {
            continue;
        };
        let chars = content.chars().count();
        if chars <= STUB_THRESHOLD {
            continue;
        }
        let before = size(m);
        m["content"] = Value::String(format!("[trimmed {chars} chars]"));
        total = total - before + size(m);
        report.tool_outputs += 1;
    }

    // 2. Oldest turns, keeping the latest user message's.
    while total > limit {
        let second_user = msgs
            .iter()
            .enumerate()
            .filter(|(_, m)| role(m) == "user")
            .nth(1)
            .map(|(i, _)| i);
        let Some(cut) = second_user else { break };
        for m in msgs.drain(..cut) {
            total -= size(&m);
            report.messages_dropped += 1;
        }
    }

    // 3. Cut the longest strings left.
    let mut cuts = 0;
    while total > limit && cuts < MAX_CUTS {
        cuts += 1;
        let Some((i, field)) = longest_string(&msgs) else {
            break;
        };
        let before = size(&msgs[i]);
        let shortened = match field {
            Field::Content => {
                let s = msgs[i]["content"].as_str().unwrap_or_default();
                if s.chars().count() < 2 * STUB_THRESHOLD {
                    break;
                }
                Value::String(cut_middle(s))
            }
            Field::Arguments(j) => {
                let s = msgs[i]["tool_calls"][j]["function"]["arguments"]
                    .as_str()
                    .unwrap_or_default();
                if s.len() < 2 * STUB_THRESHOLD {
                    break;
                }
                Value::String(
                    json!({"trimmed": format!("{} chars", s.chars().count())}).to_string(),
                )
            }
        };
        match field {
            Field::Content => msgs[i]["content"] = shortened,
            Field::Arguments(j) => msgs[i]["tool_calls"][j]["function"]["arguments"] = shortened,
        }
        total = total - before + size(&msgs[i]);
        report.strings_cut += 1;
    }

    let mut out = Vec::with_capacity(msgs.len() + 1);
    out.push(system);
    out.extend(msgs);
    (out, report)
}

#[derive(Clone, Copy)]
enum Field {
    Content,
    Arguments(usize),
}

fn longest_string(msgs: &[Value]) -> Option<(usize, Field)> {
    let mut best: Option<(usize, Field, usize)> = None;
    let mut consider = |i: usize, f: Field, len: usize| {
        if best.is_none_or(|(_, _, l)| len > l) {
            best = Some((i, f, len));
        }
    };
    for (i, m) in msgs.iter().enumerate() {
        if let Some(s) = m.get("content").and_then(Value::as_str) {
            consider(i, Field::Content, s.len());
        }
        if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
            for (j, c) in calls.iter().enumerate() {
                if let Some(s) = c.pointer("/function/arguments").and_then(Value::as_str) {
                    consider(i, Field::Arguments(j), s.len());
                }
            }
        }
    }
    best.map(|(i, f, _)| (i, f))
}

/// Keep the first and last quarter of `s`, noting what was cut.
fn cut_middle(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let keep = chars.len() / 4;
    let head: String = chars[..keep].iter().collect();
    let tail: String = chars[chars.len() - keep..].iter().collect();
    format!(
        "{head}\n[… trimmed {} chars …]\n{tail}",
        chars.len() - 2 * keep
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(id: &str) -> Value {
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": id, "type": "function", "function": {"name": "bash", "arguments": "{}"}}
        ]})
    }

    fn result(id: &str, content: &str) -> Value {
        json!({"role": "tool", "tool_call_id": id, "content": content})
    }

    fn user(s: &str) -> Value {
        json!({"role": "user", "content": s})
    }

    fn text(s: &str) -> Value {
        json!({"role": "assistant", "content": s})
    }

    #[test]
    fn repair_fills_missing_results_and_drops_strays() {
        let h = vec![
            user("a"),
            call("c1"),
            result("zz", "stray"),
            user("b"),
            call("c2"),
        ];
        let r = repair(&h);
        assert_eq!(r.len(), 6);
        assert_eq!(r[2], missing_result("c1"));
        assert_eq!(r[3], user("b"));
        assert_eq!(r[5], missing_result("c2"));
        let ok = vec![user("a"), call("c1"), result("c1", "x"), text("done")];
        assert_eq!(repair(&ok), ok);
    }

    #[test]
    fn fit_keeps_everything_under_budget() {
        let h = vec![user("a"), text("b")];
        let (msgs, t) = fit("sys", &h, 10_000);
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0]["role"], "system");
        assert!(!t.any());
    }

    #[test]
    fn fit_trims_oldest_tool_outputs_first() {
        let big = "x".repeat(3000);
        let h = vec![
            user("first"),
            call("c1"),
            result("c1", &big),
            text("ok"),
            user("second"),
            call("c2"),
            result("c2", &big),
            text("ok2"),
            user("third"),
        ];
        let (msgs, t) = fit("sys", &h, 4500);
        assert_eq!(t.tool_outputs, 1, "{t:?}");
        assert_eq!(t.messages_dropped, 0);
        assert_eq!(msgs[3]["content"], "[trimmed 3000 chars]");
        assert_eq!(msgs[7]["content"], big.as_str());
        let total: usize = msgs.iter().map(size).sum();
        assert!(total <= 4500);
    }

    #[test]
    fn fit_drops_oldest_turns_then_cuts() {
        let big = "y".repeat(3000);
        let h = vec![
            user(&big),
            text("a1"),
            user(&big),
            text("a2"),
            user("latest question"),
        ];
        let (msgs, t) = fit("sys", &h, 1000);
        assert_eq!(t.messages_dropped, 4);
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0]["role"], "system");
        assert_eq!(msgs[1], user("latest question"));

        // Only the latest turn left and still too long: strings are cut.
        let h = vec![user(&"z".repeat(5000))];
        let (msgs, t) = fit("sys", &h, 1000);
        assert!(t.strings_cut > 0);
        let total: usize = msgs.iter().map(size).sum();
        assert!(total <= 1000, "{total}");
        assert!(msgs[1]["content"].as_str().unwrap().contains("trimmed"));
    }

    #[test]
    fn persisted_lines_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("c.jsonl");
        let store = shared_store(path.clone());
        let mut h = History::new(Vec::new(), store.clone());
        h.push(user("hi"));
        h.push(text("hello"));
        assert_eq!(load(&path).unwrap(), vec![user("hi"), text("hello")]);
        store.lock().unwrap().deleted = true;
        h.push(user("lost"));
        assert_eq!(load(&path).unwrap().len(), 2);
        h.clear();
        assert!(load(&path).unwrap().is_empty());
    }
}
