//! Turn and queue bookkeeping: the messages waiting for a task, the turns
//! the agent is working on, the questions it asked. Pure data; the session
//! machine decides when messages go out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use aishell_protocol::AgentEvent;

/// Largest assistant reply kept in the store per turn.
const MAX_STORED_REPLY: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct QueuedMessage {
    pub conversation_id: String,
    pub content: String,
    pub message_id: Option<String>,
    pub received_at: Instant,
    /// Agents that died holding this message before answering it; a message
    /// that kills its agent twice is answered with an error, not retried
    /// forever.
    pub crashes: u8,
}

/// A user message the agent is working on.
#[derive(Debug)]
pub struct Turn {
    pub message: QueuedMessage,
    pub first_event_seen: bool,
    pub reply: String,
}

/// What one agent event meant for the turns.
#[derive(Debug, Default)]
pub struct EventNote {
    /// The first event of the oldest turn of its conversation: how long
    /// after the message it came.
    pub first_event_after: Option<Duration>,
    /// The event ended a turn: its conversation and the reply to store.
    pub finished: Option<(String, String)>,
}

#[derive(Debug)]
pub struct TurnBook {
    /// Client messages waiting for a ready task, in order.
    queue: VecDeque<QueuedMessage>,
    seen_message_ids: HashSet<String>,
    /// Turns in flight, per conversation, oldest first.
    turns: HashMap<String, VecDeque<Turn>>,
    /// Open `ask_question` request ids.
    questions: HashSet<String>,
    /// When processing last became idle (for the idle timer).
    idle_since: Instant,
}

impl TurnBook {
    pub fn new(now: Instant) -> Self {
        TurnBook {
            queue: VecDeque::new(),
            seen_message_ids: HashSet::new(),
            turns: HashMap::new(),
            questions: HashSet::new(),
            idle_since: now,
        }
    }

    /// Whether the agent is working on a message.
    pub fn busy(&self) -> bool {
        !self.turns.is_empty()
    }

    pub fn idle_since(&self) -> Instant {
        self.idle_since
    }

    pub fn queue_is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    #[cfg(test)]
    pub fn queued(&self) -> impl Iterator<Item = &QueuedMessage> {
        self.queue.iter()
    }

    pub fn conversation_busy(&self, conversation_id: &str) -> bool {
        self.turns.contains_key(conversation_id)
    }

    /// `idle`, `waiting_for_answer` or `processing` (logs and metrics).
    pub fn processing_state(&self) -> &'static str {
        if self.turns.is_empty() {
            "idle"
        } else if !self.questions.is_empty() {
            "waiting_for_answer"
        } else {
            "processing"
        }
    }

    pub fn seen(&self, message_id: &str) -> bool {
        self.seen_message_ids.contains(message_id)
    }

    pub fn mark_seen(&mut self, message_id: String) {
        self.seen_message_ids.insert(message_id);
    }

    pub fn push_back(&mut self, msg: QueuedMessage) {
        self.queue.push_back(msg);
    }

    pub fn pop_front(&mut self) -> Option<QueuedMessage> {
        self.queue.pop_front()
    }

    /// Drop the queued messages of `conversation_id` (all of them for `None`).
    pub fn drop_queued(&mut self, conversation_id: Option<&str>) {
        self.queue
            .retain(|m| conversation_id.is_some_and(|c| c != m.conversation_id));
    }

    /// Count a turn that was just sent to the agent.
    pub fn start_turn(&mut self, message: QueuedMessage) {
        self.turns
            .entry(message.conversation_id.clone())
            .or_default()
            .push_back(Turn {
                message,
                first_event_seen: false,
                reply: String::new(),
            });
    }

    /// Every turn in flight, oldest first; none is left.
    pub fn take_turns(&mut self) -> Vec<Turn> {
        let mut turns: Vec<Turn> = self.turns.drain().flat_map(|(_, t)| t).collect();
        turns.sort_by_key(|t| t.message.received_at);
        turns
    }

    /// Put `messages` (oldest first) back at the front of the queue.
    pub fn requeue_front(&mut self, messages: Vec<QueuedMessage>) {
        for msg in messages.into_iter().rev() {
            self.queue.push_front(msg);
        }
    }

    /// Before `ready` no agent has begun a message: put the ones sent ahead
    /// of it back at the front of the queue, in order.
    pub fn requeue_early_turns(&mut self) {
        let messages = self.take_turns().into_iter().map(|t| t.message).collect();
        self.requeue_front(messages);
    }

    pub fn question_asked(&mut self, request_id: String) {
        self.questions.insert(request_id);
    }

    pub fn question_answered(&mut self, request_id: &str) {
        self.questions.remove(request_id);
    }

    /// Processing stopped (every turn ended): the idle timer starts now.
    pub fn became_idle(&mut self, now: Instant) {
        self.questions.clear();
        self.idle_since = now;
    }

    /// The task became ready: idle from now on.
    pub fn reset_idle(&mut self, now: Instant) {
        self.idle_since = now;
    }

    /// Account an agent event to its conversation's oldest turn.
    pub fn note_event(&mut self, frame: &AgentEvent, now: Instant) -> EventNote {
        let mut note = EventNote::default();
        let Some(cid) = frame.conversation_id() else {
            return note;
        };
        let Some(turns) = self.turns.get_mut(cid) else {
            return note;
        };
        if let Some(turn) = turns.front_mut() {
            if !turn.first_event_seen {
                turn.first_event_seen = true;
                note.first_event_after = Some(now - turn.message.received_at);
            }
            match frame {
                AgentEvent::TextDelta { delta, .. } if turn.reply.len() < MAX_STORED_REPLY => {
                    turn.reply.push_str(delta)
                }
                AgentEvent::Content { content, .. } if turn.reply.is_empty() => {
                    turn.reply.push_str(content)
                }
                _ => {}
            }
        }
        if matches!(frame, AgentEvent::Finish { .. } | AgentEvent::Error { .. }) {
            let cid = cid.to_string();
            let finished = turns.pop_front();
            if turns.is_empty() {
                self.turns.remove(&cid);
            }
            if let Some(turn) = finished {
                if self.turns.is_empty() {
                    self.became_idle(now);
                }
                note.finished = Some((cid, turn.reply));
            }
        }
        note
    }
}
