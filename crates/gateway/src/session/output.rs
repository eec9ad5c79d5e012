//! What an agent's output may cost the gateway. Anything in the sandbox can
//! write to the agent's stdout, so every event it sends is untrusted in
//! size: one event is cut to [`fit_event`]'s limit, and the output of a
//! turn is stored and relayed only up to [`OutputBudget`]'s cap (see
//! ARCHITECTURE.md "Replay and durability").

use aishell_protocol::AgentEvent;

/// Bytes of agent output the session may still store, per busy period.
///
/// A busy period starts when a message reaches an idle agent and lasts
/// until the next such message; each message dispatched in it adds one
/// turn's cap. Output between turns counts against the period before, so
/// a process that keeps writing after its turn ended gets nothing new.
#[derive(Debug)]
pub(super) struct OutputBudget {
    per_turn: u64,
    allowed: u64,
    used: u64,
    /// Output was refused since the allowance last grew.
    truncated: bool,
}

/// What to do with one agent event.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admit {
    Keep,
    /// Neither store nor relay it; `notify` on the first refusal, so the
    /// client hears once that the output was truncated.
    Drop {
        notify: bool,
    },
}

impl OutputBudget {
    pub(super) fn new(per_turn: u64) -> Self {
        OutputBudget {
            per_turn,
            allowed: per_turn,
            used: 0,
            truncated: false,
        }
    }

    /// A message went to the agent; `idle_before` when no other turn was
    /// in flight (a new busy period starts from nothing).
    pub(super) fn turn_started(&mut self, idle_before: bool) {
        if idle_before {
            self.used = 0;
            self.allowed = self.per_turn;
        } else {
            self.allowed = self.allowed.saturating_add(self.per_turn);
        }
        self.truncated = false;
    }

    /// Whether an event of `bytes` may be stored and relayed. The event
    /// that ends a turn always may (the client must see the turn end);
    /// past the allowance nothing else, not even small events, until the
    /// next turn starts.
    pub(super) fn admit(&mut self, bytes: usize, ends_turn: bool) -> Admit {
        let bytes = bytes as u64;
        if ends_turn || (!self.truncated && self.used + bytes <= self.allowed) {
            self.used = self.used.saturating_add(bytes);
            return Admit::Keep;
        }
        let notify = !self.truncated;
        self.truncated = true;
        Admit::Drop { notify }
    }
}

/// Bytes `event` takes as JSON, without building the JSON.
pub(super) fn json_len(event: &AgentEvent) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, event);
    count.0
}

/// `event` cut to at most about `max` bytes of JSON: its long strings
/// shortened with a note of what was cut, a tool input over the limit
/// replaced by a note. An event that still does not fit becomes an `info`
/// saying so — except the end of a turn, which keeps its kind (and its
/// conversation) so the turn still ends for the client.
pub(super) fn fit_event(mut event: AgentEvent, max: usize) -> AgentEvent {
    let size = json_len(&event);
    let mut now = size;
    // Room per string: first all but a margin for the frame and the notes;
    // while it does not fit (several long strings, or text that grows when
    // escaped), less in proportion.
    let mut room = max.saturating_sub(1024).max(64);
    for _ in 0..4 {
        if now <= max {
            return event;
        }
        shorten_strings(&mut event, room, max);
        now = json_len(&event);
        room = ((room as u128 * max as u128 / now.max(1) as u128) as usize)
            .saturating_sub(1024)
            .max(64);
    }
    if now <= max {
        return event;
    }
    let message =
        format!("the agent sent an event of {size} bytes (the limit is {max}); it was dropped");
    match event {
        AgentEvent::Finish {
            conversation_id,
            token_usage,
        } => AgentEvent::Finish {
            conversation_id,
            token_usage,
        },
        AgentEvent::Error {
            conversation_id, ..
        } => AgentEvent::Error {
            conversation_id,
            error: aishell_protocol::ErrorBody::new(
                aishell_protocol::ErrorCode::AgentCrashed,
                message,
            ),
        },
        _ => AgentEvent::Info { message },
    }
}

/// Cut every string of `event` longer than `room` bytes, noting how much
/// was cut; a JSON value (tool input, ping id) over it becomes such a note.
fn shorten_strings(event: &mut AgentEvent, room: usize, max: usize) {
    let note =
        |cut: usize| format!(" [… {cut} bytes cut: an agent event may carry at most {max} bytes]");
    let shorten = |s: &mut String| {
        if s.len() > room {
            let cut_at = floor_char_boundary(s, room);
            let cut = s.len() - cut_at;
            s.truncate(cut_at);
            s.push_str(&note(cut));
            s.shrink_to_fit();
        }
    };
    let shorten_value = |v: &mut serde_json::Value| {
        let len = json_len_value(v);
        if len > room {
            *v = serde_json::Value::String(note(len));
        }
    };
    match event {
        AgentEvent::Init(info) => {
            info.agent.iter_mut().for_each(shorten);
            info.version.iter_mut().for_each(shorten);
            info.capabilities.iter_mut().for_each(shorten);
        }
        AgentEvent::Thinking {
            conversation_id,
            content,
        } => {
            conversation_id.iter_mut().for_each(shorten);
            content.iter_mut().for_each(shorten);
        }
        AgentEvent::TextDelta {
            conversation_id,
            delta: text,
        }
        | AgentEvent::Content {
            conversation_id,
            content: text,
        } => {
            shorten(conversation_id);
            shorten(text);
        }
        AgentEvent::ToolCall {
            conversation_id,
            tool_call_id,
            tool_name,
            tool_input,
        } => {
            conversation_id.iter_mut().for_each(shorten);
            shorten(tool_call_id);
            shorten(tool_name);
            shorten_value(tool_input);
        }
        AgentEvent::ToolResult {
            conversation_id,
            tool_call_id,
            content,
            ..
        } => {
            conversation_id.iter_mut().for_each(shorten);
            shorten(tool_call_id);
            shorten(content);
        }
        AgentEvent::AskQuestion {
            conversation_id,
            request_id,
            question,
            options,
        } => {
            conversation_id.iter_mut().for_each(shorten);
            shorten(request_id);
            shorten(question);
            options.iter_mut().flatten().for_each(shorten);
        }
        AgentEvent::Progress {
            conversation_id, ..
        } => conversation_id.iter_mut().for_each(shorten),
        AgentEvent::Finish {
            conversation_id, ..
        } => shorten(conversation_id),
        AgentEvent::ConversationUpdate {
            conversation_id,
            title,
            resume_handle,
        } => {
            shorten(conversation_id);
            title.iter_mut().for_each(shorten);
            // A cut handle resumes nothing: drop it.
            if resume_handle.as_ref().is_some_and(|h| h.len() > room) {
                *resume_handle = None;
            }
        }
        AgentEvent::Info { message } => shorten(message),
        AgentEvent::Error {
            conversation_id,
            error,
        } => {
            conversation_id.iter_mut().for_each(shorten);
            shorten(&mut error.code);
            shorten(&mut error.message);
        }
        AgentEvent::Pong { id } => shorten_value(id),
    }
}

/// Give memory freed after a huge event back to the system, once the
/// burst it came in is over. glibc keeps freed heap memory (and raises its
/// mmap threshold after large frees, so later large buffers come from the
/// heap too); without this, a flood of huge lines left the gateway's RSS
/// hundreds of megabytes up for good.
pub(super) fn release_freed_memory() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SCHEDULED: AtomicBool = AtomicBool::new(false);
    if SCHEDULED.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        SCHEDULED.store(false, Ordering::Release);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        let _ = tokio::task::spawn_blocking(|| {
            // SAFETY: malloc_trim only walks the allocator's own free lists.
            unsafe { libc::malloc_trim(0) };
        })
        .await;
    });
}

fn json_len_value(v: &serde_json::Value) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |b| b.len())
}

/// The largest char boundary of `s` at or below `at`.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut i = at.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_stores_up_to_its_cap_then_tells_once_and_still_ends() {
        let mut b = OutputBudget::new(1000);
        b.turn_started(true);
        assert_eq!(b.admit(600, false), Admit::Keep);
        assert_eq!(b.admit(300, false), Admit::Keep);
        assert_eq!(b.admit(200, false), Admit::Drop { notify: true });
        assert_eq!(
            b.admit(10, false),
            Admit::Drop { notify: false },
            "nothing more, even small"
        );
        assert_eq!(
            b.admit(50, true),
            Admit::Keep,
            "the turn's end goes through"
        );
        assert_eq!(
            b.admit(10, false),
            Admit::Drop { notify: false },
            "output after the turn counts against it"
        );
        // The next message starts afresh.
        b.turn_started(true);
        assert_eq!(b.admit(900, false), Admit::Keep);
    }

    #[test]
    fn each_turn_in_flight_adds_its_cap() {
        let mut b = OutputBudget::new(1000);
        b.turn_started(true);
        assert_eq!(b.admit(1000, false), Admit::Keep);
        assert_eq!(b.admit(1, false), Admit::Drop { notify: true });
        b.turn_started(false);
        assert_eq!(b.admit(1000, false), Admit::Keep);
        assert_eq!(b.admit(1, false), Admit::Drop { notify: true });
    }

    #[test]
    fn a_huge_delta_is_cut_with_a_note_and_keeps_its_conversation() {
        let event = AgentEvent::TextDelta {
            conversation_id: "c1".into(),
            delta: "é".repeat(3_000_000),
        };
        let cut = fit_event(event, 1 << 20);
        assert!(json_len(&cut) <= 1 << 20, "{}", json_len(&cut));
        let AgentEvent::TextDelta {
            conversation_id,
            delta,
        } = cut
        else {
            panic!("still a text delta")
        };
        assert_eq!(conversation_id, "c1");
        assert!(delta.ends_with("bytes cut: an agent event may carry at most 1048576 bytes]"));
        assert!(delta.starts_with("éé"));
    }

    #[test]
    fn an_event_that_cannot_be_cut_enough_becomes_a_note_but_a_finish_stays_a_finish() {
        let many = AgentEvent::AskQuestion {
            conversation_id: None,
            request_id: "r".into(),
            question: "q".into(),
            options: Some(vec!["o".repeat(100); 100_000]),
        };
        let AgentEvent::Info { message } = fit_event(many, 1 << 16) else {
            panic!("replaced by a note")
        };
        assert!(message.contains("it was dropped"), "{message}");
        let finish = AgentEvent::Finish {
            conversation_id: "c".repeat(5 << 20),
            token_usage: Default::default(),
        };
        assert!(matches!(
            fit_event(finish, 1 << 20),
            AgentEvent::Finish { .. }
        ));
        let small = AgentEvent::Info {
            message: "hi".into(),
        };
        assert_eq!(fit_event(small.clone(), 1 << 20), small);
    }
}
