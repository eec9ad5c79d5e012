//! Server-sent events as OpenAI-compatible Chat Completions stream them, and
//! the assembly of one assistant message from the chunks.
//!
//! * [`SseDecoder`]: bytes (split anywhere, even inside a UTF-8 character or
//!   a `\r\n`) → event payloads. `data:` lines of one event are joined with
//!   `\n`; an event ends at a blank line (or at the end of the stream);
//!   comments (`:`) and other fields (`event:`, `id:`, `retry:`) are ignored.
//! * [`Accumulator`]: payloads → the assistant message. `[DONE]` ends the
//!   stream; `choices[0].delta.content` is text; `reasoning_content` /
//!   `reasoning` is thinking; `tool_calls[i]` fragments are merged by `index`
//!   (id and name from whichever fragment carries them, `arguments`
//!   concatenated); `finish_reason` and `usage` (usually in a last chunk with
//!   no choices) are kept. An `{"error": …}` payload is an error.

use std::collections::BTreeMap;

use serde_json::Value;

/// Splits a byte stream into SSE event payloads.
#[derive(Default)]
pub(crate) struct SseDecoder {
    /// Bytes of the current, still incomplete line.
    line: Vec<u8>,
    /// `data:` values of the current event.
    data: Vec<String>,
}

impl SseDecoder {
    /// Feed bytes; returns the payloads of the events they completed.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&rest[..i]);
            rest = &rest[i + 1..];
            let line = std::mem::take(&mut self.line);
            self.line_done(line, &mut events);
        }
        self.line.extend_from_slice(rest);
        events
    }

    /// End of stream: whatever event is still open counts.
    pub(crate) fn finish(&mut self) -> Vec<String> {
        let mut events = Vec::new();
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(line, &mut events);
        }
        if !self.data.is_empty() {
            events.push(self.data.join("\n"));
            self.data.clear();
        }
        events
    }

    fn line_done(&mut self, mut line: Vec<u8>, events: &mut Vec<String>) {
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            if !self.data.is_empty() {
                events.push(self.data.join("\n"));
                self.data.clear();
            }
            return;
        }
        let line = String::from_utf8_lossy(&line);
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        if field == "data" {
            self.data.push(value.to_string());
        }
    }
}

/// One tool call of the assistant message.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ToolCall {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) arguments: String,
}

/// Token usage as the server reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
}

/// Something to show while the message streams.
#[derive(Debug, PartialEq)]
pub(crate) enum Delta {
    Text(String),
    Reasoning(String),
}

/// Builds one assistant message from stream payloads.
#[derive(Debug, Default)]
pub(crate) struct Accumulator {
    pub(crate) content: String,
    pub(crate) reasoning: String,
    calls: BTreeMap<u64, ToolCall>,
    pub(crate) finish_reason: Option<String>,
    pub(crate) usage: Option<Usage>,
    /// `[DONE]` was seen.
    pub(crate) done: bool,
}

impl Accumulator {
    /// The stream ended properly (`[DONE]` or a finish reason).
    pub(crate) fn complete(&self) -> bool {
        self.done || self.finish_reason.is_some()
    }

    /// The tool calls, in index order, with ids filled in where the server
    /// sent none.
    pub(crate) fn tool_calls(&self) -> Vec<ToolCall> {
        self.calls
            .values()
            .filter(|c| !c.name.is_empty() || !c.arguments.is_empty())
            .map(|c| {
                let mut c = c.clone();
                if c.id.is_empty() {
                    c.id = format!("call_{}", uuid::Uuid::new_v4().simple());
                }
                c
            })
            .collect()
    }

    /// Handle one event payload. `Err` for an error the server reported in
    /// the stream.
    pub(crate) fn handle(&mut self, payload: &str) -> Result<Vec<Delta>, String> {
        let payload = payload.trim();
        if payload.is_empty() {
            return Ok(Vec::new());
        }
        if payload == "[DONE]" {
            self.done = true;
            return Ok(Vec::new());
        }
        match serde_json::from_str::<Value>(payload) {
            Ok(v) => self.chunk(&v),
            // Some servers omit the blank line between events, which joins
            // two payloads with `\n`: take them one by one.
            Err(_) if payload.contains('\n') => {
                let mut deltas = Vec::new();
                for part in payload.split('\n') {
                    deltas.extend(self.handle(part)?);
                }
                Ok(deltas)
            }
            Err(e) => {
                eprintln!(
                    "llm agent: ignoring an undecodable stream event ({e}): {}",
                    excerpt(payload, 200)
                );
                Ok(Vec::new())
            }
        }
    }

    /// A whole (non-streaming) response, for servers that ignore `stream`.
    pub(crate) fn whole(&mut self, v: &Value) -> Result<(), String> {
        if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
            return Err(error_text(err));
        }
        if let Some(choice) = v.get("choices").and_then(|c| c.get(0)) {
            if let Some(msg) = choice.get("message") {
                self.delta(msg);
            }
            self.finish(choice);
        }
        self.take_usage(v);
        self.done = true;
        Ok(())
    }

    fn chunk(&mut self, v: &Value) -> Result<Vec<Delta>, String> {
        if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
            return Err(error_text(err));
        }
        let mut deltas = Vec::new();
        if let Some(choice) = v.get("choices").and_then(|c| c.get(0)) {
            if let Some(delta) = choice.get("delta").or_else(|| choice.get("message")) {
                deltas = self.delta(delta);
            }
            self.finish(choice);
        }
        self.take_usage(v);
        Ok(deltas)
    }

    fn finish(&mut self, choice: &Value) {
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str)
            && !reason.is_empty()
        {
            self.finish_reason = Some(reason.to_string());
        }
    }

    fn take_usage(&mut self, v: &Value) {
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
            self.usage = Some(Usage {
                prompt_tokens: n("prompt_tokens"),
                completion_tokens: n("completion_tokens"),
            });
        }
    }

    fn delta(&mut self, delta: &Value) -> Vec<Delta> {
        let mut out = Vec::new();
        for key in ["reasoning_content", "reasoning"] {
            if let Some(r) = delta.get(key).and_then(Value::as_str)
                && !r.is_empty()
            {
                self.reasoning.push_str(r);
                out.push(Delta::Reasoning(r.to_string()));
                break;
            }
        }
        if let Some(text) = delta.get("content").and_then(Value::as_str)
            && !text.is_empty()
        {
            self.content.push_str(text);
            out.push(Delta::Text(text.to_string()));
        }
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for (pos, call) in calls.iter().enumerate() {
                let index = call
                    .get("index")
                    .and_then(Value::as_u64)
                    .unwrap_or(pos as u64);
                let entry = self.calls.entry(index).or_default();
                if let Some(id) = call.get("id").and_then(Value::as_str)
                    && !id.is_empty()
                    && entry.id.is_empty()
                {
                    entry.id = id.to_string();
                }
                let Some(function) = call.get("function") else {
                    continue;
                };
                if let Some(name) = function.get("name").and_then(Value::as_str)
                    && !name.is_empty()
                    && entry.name != name
                {
                    // Most servers send the name once; some repeat it in
                    // every fragment, a few split it.
                    entry.name.push_str(name);
                }
                match function.get("arguments") {
                    Some(Value::String(s)) => entry.arguments.push_str(s),
                    Some(Value::Null) | None => {}
                    // A server that sends the arguments as an object.
                    Some(other) => entry.arguments.push_str(&other.to_string()),
                }
            }
        }
        out
    }
}

/// The message of an OpenAI-style error object (or the whole value).
pub(crate) fn error_text(err: &Value) -> String {
    match err {
        Value::String(s) => s.clone(),
        Value::Object(o) => match o.get("message").and_then(Value::as_str) {
            Some(m) => m.to_string(),
            None => err.to_string(),
        },
        other => other.to_string(),
    }
}

/// At most `max` characters of `s`, with `…` when cut.
pub(crate) fn excerpt(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut cut: String = s.chars().take(max).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        ": keep-alive\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Héllo \"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"wörld\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"write_file\",\"arguments\":\"\"}}]}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"path\\\": \\\"a\"}}]}}]}\n\n",
        "event: message\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\".md\\\"}\"}}]}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"call_2\",\"function\":{\"name\":\"read_file\",\"arguments\":\"{}\"}}]}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7,\"total_tokens\":18}}\n\n",
        "data: [DONE]\n\n",
    );

    fn run(chunks: &[&[u8]]) -> (Accumulator, String) {
        let mut dec = SseDecoder::default();
        let mut acc = Accumulator::default();
        let mut text = String::new();
        let mut payloads = Vec::new();
        for c in chunks {
            payloads.extend(dec.push(c));
        }
        payloads.extend(dec.finish());
        for p in payloads {
            for d in acc.handle(&p).unwrap() {
                if let Delta::Text(t) = d {
                    text.push_str(&t);
                }
            }
        }
        (acc, text)
    }

    #[test]
    fn any_split_gives_the_same_message() {
        let bytes = STREAM.as_bytes();
        for split in 0..=bytes.len() {
            let (acc, text) = run(&[&bytes[..split], &bytes[split..]]);
            assert_eq!(text, "Héllo wörld", "split at {split}");
            assert_eq!(acc.content, "Héllo wörld");
            let calls = acc.tool_calls();
            assert_eq!(calls.len(), 2, "split at {split}");
            assert_eq!(calls[0].id, "call_1");
            assert_eq!(calls[0].name, "write_file");
            assert_eq!(calls[0].arguments, "{\"path\": \"a.md\"}");
            assert_eq!(calls[1].name, "read_file");
            assert_eq!(acc.finish_reason.as_deref(), Some("tool_calls"));
            assert_eq!(
                acc.usage,
                Some(Usage {
                    prompt_tokens: 11,
                    completion_tokens: 7
                })
            );
            assert!(acc.done && acc.complete());
        }
        // One byte at a time.
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        let (acc, text) = run(&singles);
        assert_eq!(text, "Héllo wörld");
        assert_eq!(acc.tool_calls().len(), 2);
    }

    #[test]
    fn missing_blank_lines_and_trailing_event() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"},\"finish_reason\":\"stop\"}]}";
        let (acc, text) = run(&[stream.as_bytes()]);
        assert_eq!(text, "ab");
        assert!(acc.complete());
        assert!(!acc.done);
    }

    #[test]
    fn cut_stream_is_incomplete() {
        let bytes = STREAM.as_bytes();
        let (acc, _) = run(&[&bytes[..bytes.len() / 2]]);
        assert!(!acc.complete());
    }

    #[test]
    fn error_payload_and_repeated_names() {
        let mut acc = Accumulator::default();
        assert_eq!(
            acc.handle("{\"error\":{\"message\":\"overloaded\",\"code\":503}}"),
            Err("overloaded".to_string())
        );
        let mut acc = Accumulator::default();
        for frag in ["{\"a\":", "1}"] {
            let chunk = serde_json::json!({"choices":[{"delta":{"tool_calls":[{"index":0,"id":"x","function":{"name":"bash","arguments":frag}}]}}]});
            acc.handle(&chunk.to_string()).unwrap();
        }
        let calls = acc.tool_calls();
        assert_eq!(calls[0].name, "bash");
        assert_eq!(calls[0].arguments, "{\"a\":1}");
    }

    #[test]
    fn reasoning_and_generated_ids() {
        let mut acc = Accumulator::default();
        let d = acc
            .handle(r#"{"choices":[{"delta":{"reasoning_content":"hmm","tool_calls":[{"function":{"name":"list_files","arguments":"{}"}}]}}]}"#)
            .unwrap();
        assert_eq!(d, vec![Delta::Reasoning("hmm".into())]);
        let calls = acc.tool_calls();
        assert!(calls[0].id.starts_with("call_"));
    }
}
