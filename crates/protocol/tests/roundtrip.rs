//! Property tests of every wire type: encode → decode gives the same value,
//! and garbage input never panics and fails with the right error kind.

use std::collections::BTreeMap;

use aishell_protocol::DecodeError;
use aishell_protocol::agent::{AgentEvent, AgentInfo, AgentInput, ConversationRef, TokenUsage};
use aishell_protocol::client::{
    ClientFrame, ConversationSummary, ServerEvent, ServerFrame, TaskPhase, TaskSource,
};
use aishell_protocol::codes::{ErrorBody, ErrorCode};
use aishell_protocol::runner::{AgentSpec, GatewayToRunner, RunnerSettings, RunnerToGateway};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------- strategies

/// Arbitrary unicode, including control characters, quotes and newlines.
fn s() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>(),
        1 => "[a-z\"\\\\\n\r\t{}:,\u{0}\u{7f}\u{2028}é😀]{0,12}",
    ]
}

fn os() -> impl Strategy<Value = Option<String>> {
    option::of(s())
}

/// Any JSON value that survives a text round trip exactly. Floats are limited
/// to short binary fractions: serde_json's default float parser is only
/// guaranteed to be within one ULP for arbitrary ones.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1_000_000i32..1_000_000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
        s().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map(s(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_map() -> impl Strategy<Value = Map<String, Value>> {
    btree_map(s(), json_value(), 0..4).prop_map(|m| m.into_iter().collect())
}

fn token_usage() -> impl Strategy<Value = TokenUsage> {
    (any::<u64>(), any::<u64>()).prop_map(|(input_tokens, output_tokens)| TokenUsage {
        input_tokens,
        output_tokens,
    })
}

fn agent_info() -> impl Strategy<Value = AgentInfo> {
    (os(), os(), vec(s(), 0..3)).prop_map(|(agent, version, capabilities)| AgentInfo {
        agent,
        version,
        capabilities,
    })
}

fn conversation_ref() -> impl Strategy<Value = ConversationRef> {
    (s(), os()).prop_map(|(conversation_id, resume_handle)| ConversationRef {
        conversation_id,
        resume_handle,
    })
}

fn error_body() -> impl Strategy<Value = ErrorBody> {
    prop_oneof![
        (s(), s()).prop_map(|(code, message)| ErrorBody {
            code,
            message,
            reason: None,
        }),
        (proptest::sample::select(ErrorCode::ALL.to_vec()), s())
            .prop_map(|(code, message)| ErrorBody::new(code, message)),
    ]
}

fn agent_input() -> impl Strategy<Value = AgentInput> {
    prop_oneof![
        (
            os(),
            json_map(),
            vec((s(), s()), 0..3),
            proptest::option::of((any::<u32>(), any::<u32>()))
        )
            .prop_map(|(workspace, settings, env, run_as)| {
                AgentInput::Init {
                    workspace,
                    settings,
                    env: env.into_iter().collect(),
                    run_as: run_as.map(|(uid, gid)| aishell_protocol::agent::RunAs { uid, gid }),
                }
            }),
        (s(), s(), os()).prop_map(|(conversation_id, content, message_id)| {
            AgentInput::Message {
                conversation_id,
                content,
                message_id,
            }
        }),
        os().prop_map(|conversation_id| AgentInput::Abort { conversation_id }),
        (s(), s())
            .prop_map(|(request_id, answer)| AgentInput::AnswerQuestion { request_id, answer }),
        s().prop_map(|conversation_id| AgentInput::ResetConversation { conversation_id }),
        s().prop_map(|conversation_id| AgentInput::DeleteConversation { conversation_id }),
        vec(conversation_ref(), 0..4)
            .prop_map(|conversations| AgentInput::RestoreConversations { conversations }),
        json_value().prop_map(|id| AgentInput::Ping { id }),
    ]
}

fn agent_event() -> impl Strategy<Value = AgentEvent> {
    prop_oneof![
        agent_info().prop_map(AgentEvent::Init),
        (os(), os()).prop_map(|(conversation_id, content)| AgentEvent::Thinking {
            conversation_id,
            content
        }),
        (s(), s()).prop_map(|(conversation_id, delta)| AgentEvent::TextDelta {
            conversation_id,
            delta
        }),
        (s(), s()).prop_map(|(conversation_id, content)| AgentEvent::Content {
            conversation_id,
            content
        }),
        (os(), s(), s(), json_value()).prop_map(
            |(conversation_id, tool_call_id, tool_name, tool_input)| AgentEvent::ToolCall {
                conversation_id,
                tool_call_id,
                tool_name,
                tool_input,
            }
        ),
        (os(), s(), s(), any::<bool>()).prop_map(
            |(conversation_id, tool_call_id, content, is_error)| AgentEvent::ToolResult {
                conversation_id,
                tool_call_id,
                content,
                is_error,
            }
        ),
        (os(), s(), s(), option::of(vec(s(), 0..3))).prop_map(
            |(conversation_id, request_id, question, options)| AgentEvent::AskQuestion {
                conversation_id,
                request_id,
                question,
                options,
            }
        ),
        (os(), token_usage()).prop_map(|(conversation_id, token_usage)| AgentEvent::Progress {
            conversation_id,
            token_usage
        }),
        (s(), token_usage()).prop_map(|(conversation_id, token_usage)| AgentEvent::Finish {
            conversation_id,
            token_usage
        }),
        (s(), os(), os()).prop_map(|(conversation_id, title, resume_handle)| {
            AgentEvent::ConversationUpdate {
                conversation_id,
                title,
                resume_handle,
            }
        }),
        s().prop_map(|message| AgentEvent::Info { message }),
        (os(), error_body()).prop_map(|(conversation_id, error)| AgentEvent::Error {
            conversation_id,
            error
        }),
        json_value().prop_map(|id| AgentEvent::Pong { id }),
    ]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (os(), os(), s()).prop_map(|(id, conversation_id, content)| ClientFrame::Message {
            id,
            conversation_id,
            content
        }),
        os().prop_map(|conversation_id| ClientFrame::Abort { conversation_id }),
        (s(), s())
            .prop_map(|(request_id, answer)| ClientFrame::AnswerQuestion { request_id, answer }),
        s().prop_map(|token| ClientFrame::UpdateToken { token }),
        Just(ClientFrame::ListConversations),
        s().prop_map(|conversation_id| ClientFrame::ResetConversation { conversation_id }),
        s().prop_map(|conversation_id| ClientFrame::DeleteConversation { conversation_id }),
        json_value().prop_map(|id| ClientFrame::Ping { id }),
        option::of(any::<u64>()).prop_map(|seq| ClientFrame::Ack { seq }),
    ]
}

fn runner_to_gateway() -> impl Strategy<Value = RunnerToGateway> {
    prop_oneof![
        (any::<u32>(), s(), s(), os(), any::<bool>(), any::<u64>()).prop_map(
            |(protocol, task_id, runner_version, session_id, agent_running, inputs_received)| {
                RunnerToGateway::Hello {
                    protocol,
                    task_id,
                    runner_version,
                    session_id,
                    agent_running,
                    inputs_received,
                }
            }
        ),
        (agent_info(), option::of(any::<u64>()), any::<bool>()).prop_map(
            |(agent, agent_start_ms, prestarted)| RunnerToGateway::Ready {
                agent,
                agent_start_ms,
                prestarted,
            }
        ),
        (any::<u64>(), agent_event())
            .prop_map(|(seq, frame)| RunnerToGateway::Agent { seq, frame }),
        any::<u32>().prop_map(|count| RunnerToGateway::Restored { count }),
        any::<bool>().prop_map(|prestarted| RunnerToGateway::Prepared { prestarted }),
        (option::of(any::<i32>()), option::of(any::<i32>()), s()).prop_map(
            |(code, signal, stderr_tail)| RunnerToGateway::AgentExit {
                code,
                signal,
                stderr_tail,
            }
        ),
        s().prop_map(|line| RunnerToGateway::AgentStderr { line }),
        s().prop_map(|message| RunnerToGateway::StartFailed { message }),
        any::<u64>().prop_map(|inputs_received| RunnerToGateway::Heartbeat { inputs_received }),
    ]
}

fn runner_settings() -> impl Strategy<Value = RunnerSettings> {
    (
        s(),
        option::of(vec(s(), 0..3)),
        btree_map(s(), s(), 0..3),
        json_map(),
    )
        .prop_map(|(kind, command, env, agent_settings)| RunnerSettings {
            model_proxy: vec![],
            sandbox: (kind.len() % 2 == 0).then_some(aishell_protocol::runner::SandboxSettings {
                isolation: Default::default(),
                network: kind.len() % 3 == 0,
                egress: if kind.len() % 4 == 0 {
                    aishell_protocol::runner::EgressMode::Full
                } else {
                    aishell_protocol::runner::EgressMode::Proxy
                },
                egress_allow: if kind.len() % 2 == 1 {
                    vec!["10.0.0.0/8".to_string()]
                } else {
                    Vec::new()
                },
                memory_bytes: Some(kind.len() as u64),
                max_files: None,
                max_processes: None,
                cpu_seconds: Some(1),
                sandbox_max_processes: (kind.len() % 5 == 0).then_some(64),
                sandbox_memory_bytes: None,
                tmp_bytes: Some(1 << 20),
            }),
            agent: AgentSpec { kind, command },
            env: env.into_iter().collect::<BTreeMap<_, _>>(),
            agent_settings,
        })
}

fn gateway_to_runner() -> impl Strategy<Value = GatewayToRunner> {
    prop_oneof![
        (s(), s(), s(), os(), runner_settings()).prop_map(
            |(user_id, session_id, workspace, trace_id, settings)| GatewayToRunner::InitUser {
                user_id,
                session_id,
                workspace,
                trace_id,
                settings,
            }
        ),
        runner_settings().prop_map(|settings| GatewayToRunner::Prepare { settings }),
        (any::<u64>(), agent_input())
            .prop_map(|(seq, frame)| GatewayToRunner::Agent { seq, frame }),
        vec(conversation_ref(), 0..4)
            .prop_map(|conversations| GatewayToRunner::RestoreConversations { conversations }),
        any::<u64>().prop_map(|seq| GatewayToRunner::Ack { seq }),
        Just(GatewayToRunner::Ping),
        s().prop_map(|reason| GatewayToRunner::Shutdown { reason }),
    ]
}

fn server_event() -> impl Strategy<Value = ServerEvent> {
    let phase = prop_oneof![
        Just(TaskPhase::Starting),
        Just(TaskPhase::Restarting),
        Just(TaskPhase::Ready),
        Just(TaskPhase::Stopped),
    ];
    let source = option::of(prop_oneof![Just(TaskSource::Warm), Just(TaskSource::Cold)]);
    let summary =
        (s(), os(), s(), s()).prop_map(|(conversation_id, title, created_at, updated_at)| {
            ConversationSummary {
                conversation_id,
                title,
                created_at,
                updated_at,
            }
        });
    prop_oneof![
        1 => (s(), any::<bool>(), any::<u64>(), any::<u32>(), s()).prop_map(
            |(state, resumed, last_seq, protocol, user_id)| ServerEvent::Session {
                state,
                resumed,
                last_seq,
                protocol,
                user_id,
            }
        ),
        1 => (phase, source, option::of(any::<u64>())).prop_map(|(state, source, eta_ms)| {
            ServerEvent::Status {
                state,
                source,
                eta_ms,
            }
        }),
        1 => any::<u32>().prop_map(|restored| ServerEvent::SessionRecovered { restored }),
        1 => vec(summary, 0..3).prop_map(|conversations| ServerEvent::Conversations { conversations }),
        3 => agent_event().prop_map(ServerEvent::Agent),
    ]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    (any::<u64>(), s(), any::<bool>(), server_event()).prop_map(
        |(seq, session_id, ephemeral, event)| ServerFrame {
            seq,
            session_id,
            ephemeral,
            event,
        },
    )
}

// ---------------------------------------------------------------- round trips

fn one_line(line: &str) {
    assert!(line.ends_with('\n'), "{line:?}");
    assert!(!line[..line.len() - 1].contains('\n'), "{line:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn client_frame_round_trips(frame in client_frame()) {
        let text = serde_json::to_string(&frame).unwrap();
        prop_assert_eq!(ClientFrame::decode(&text).unwrap(), frame);
    }

    #[test]
    fn agent_input_round_trips(input in agent_input()) {
        let line = input.to_line();
        one_line(&line);
        prop_assert_eq!(AgentInput::decode_line(&line).unwrap(), input);
    }

    #[test]
    fn agent_event_round_trips(event in agent_event()) {
        let line = event.to_line();
        one_line(&line);
        prop_assert_eq!(AgentEvent::decode_line(&line).unwrap(), event);
    }

    #[test]
    fn runner_to_gateway_round_trips(frame in runner_to_gateway()) {
        let text = serde_json::to_string(&frame).unwrap();
        prop_assert_eq!(RunnerToGateway::decode(&text).unwrap(), frame);
    }

    #[test]
    fn gateway_to_runner_round_trips(frame in gateway_to_runner()) {
        let text = serde_json::to_string(&frame).unwrap();
        prop_assert_eq!(GatewayToRunner::decode(&text).unwrap(), frame);
    }

    #[test]
    fn server_frame_round_trips(frame in server_frame()) {
        let text = frame.to_json();
        let back: ServerFrame = serde_json::from_str(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        prop_assert_eq!(back, frame);
    }

    /// Agent output is forwarded to clients unchanged: the same object, plus
    /// `seq` and `session_id`.
    #[test]
    fn server_frame_of_an_agent_event_is_the_event_plus_envelope(
        event in agent_event(), seq in any::<u64>(), session_id in s()
    ) {
        let frame = ServerFrame {
            seq,
            session_id: session_id.clone(),
            ephemeral: false,
            event: ServerEvent::Agent(event.clone()),
        };
        let mut flat: Value = serde_json::from_str(&frame.to_json()).unwrap();
        let obj = flat.as_object_mut().unwrap();
        prop_assert_eq!(obj.remove("seq"), Some(json!(seq)));
        prop_assert_eq!(obj.remove("session_id"), Some(json!(session_id)));
        prop_assert_eq!(flat, serde_json::to_value(&event).unwrap());
    }
}

// ---------------------------------------------------------------- garbage

/// What `decode` must say about `text`, judged independently.
fn check_error_kind(
    text: &str,
    types: &[&str],
    err: Option<&DecodeError>,
) -> Result<(), TestCaseError> {
    let value: Result<Value, _> = serde_json::from_str(text);
    match value {
        Err(_) => prop_assert!(
            matches!(err, Some(DecodeError::NotJson(_))),
            "non-JSON {:?} gave {:?}",
            text,
            err
        ),
        Ok(v) => match v.get("type").and_then(Value::as_str) {
            None => prop_assert!(
                matches!(err, Some(DecodeError::NoType)),
                "typeless {:?} gave {:?}",
                text,
                err
            ),
            Some(kind) if !types.contains(&kind) => match err {
                Some(DecodeError::UnknownType(got)) => {
                    let want: String = kind.chars().take(64).collect();
                    prop_assert_eq!(got, &want);
                }
                other => prop_assert!(false, "unknown type {:?} gave {:?}", kind, other),
            },
            Some(kind) => prop_assert!(
                err.is_none()
                    || matches!(err, Some(DecodeError::Malformed { kind: k, .. }) if k == kind),
                "known type {:?} gave {:?}",
                kind,
                err
            ),
        },
    }
    Ok(())
}

fn check_all(text: &str) -> Result<(), TestCaseError> {
    check_error_kind(
        text,
        ClientFrame::TYPES,
        ClientFrame::decode(text).err().as_ref(),
    )?;
    check_error_kind(
        text,
        AgentEvent::TYPES,
        AgentEvent::decode_line(text).err().as_ref(),
    )?;
    check_error_kind(
        text,
        RunnerToGateway::TYPES,
        RunnerToGateway::decode(text).err().as_ref(),
    )?;
    check_error_kind(
        text,
        AgentInput::TYPES,
        AgentInput::decode_line(text).err().as_ref(),
    )?;
    check_error_kind(
        text,
        GatewayToRunner::TYPES,
        GatewayToRunner::decode(text).err().as_ref(),
    )?;
    Ok(())
}

/// A `type` value: usually a known name of some protocol, sometimes noise.
fn type_value() -> impl Strategy<Value = Value> {
    let mut known: Vec<&'static str> = Vec::new();
    known.extend(ClientFrame::TYPES);
    known.extend(AgentEvent::TYPES);
    known.extend(AgentInput::TYPES);
    known.extend(RunnerToGateway::TYPES);
    known.extend(GatewayToRunner::TYPES);
    prop_oneof![
        3 => proptest::sample::select(known).prop_map(Value::from),
        3 => s().prop_map(Value::String),
        1 => "[a-z_]{65,90}".prop_map(Value::String),
        1 => json_value(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn arbitrary_strings_never_panic(text in any::<String>()) {
        check_all(&text)?;
    }

    #[test]
    fn json_ish_strings_never_panic(text in "[\\[\\]{}\",:0-9a-z \\\\.-]{0,48}") {
        check_all(&text)?;
    }

    #[test]
    fn objects_with_random_types_never_panic(
        ty in type_value(), mut fields in json_map(), with_type in any::<bool>()
    ) {
        if with_type {
            fields.insert("type".to_string(), ty);
        } else {
            fields.remove("type");
        }
        check_all(&Value::Object(fields).to_string())?;
    }

    #[test]
    fn non_json_is_not_json(text in "[^\\[\\]{}\"0-9tfn \\t\\r\\n-][^\\x00]{0,32}") {
        for err in [
            ClientFrame::decode(&text).err(),
            AgentEvent::decode_line(&text).err(),
            RunnerToGateway::decode(&text).err(),
        ] {
            prop_assert!(matches!(err, Some(DecodeError::NotJson(_))), "{:?}: {:?}", text, err);
        }
    }

    #[test]
    fn unknown_types_are_unknown(ty in "[a-z_]{1,20}|[^a-z]{1,10}", fields in json_map()) {
        let mut fields = fields;
        fields.insert("type".to_string(), Value::String(ty.clone()));
        let text = Value::Object(fields).to_string();
        if !ClientFrame::TYPES.contains(&ty.as_str()) {
            prop_assert!(matches!(ClientFrame::decode(&text), Err(DecodeError::UnknownType(t)) if t == ty));
        }
        if !AgentEvent::TYPES.contains(&ty.as_str()) {
            prop_assert!(matches!(AgentEvent::decode_line(&text), Err(DecodeError::UnknownType(t)) if t == ty));
        }
        if !RunnerToGateway::TYPES.contains(&ty.as_str()) {
            prop_assert!(matches!(RunnerToGateway::decode(&text), Err(DecodeError::UnknownType(t)) if t == ty));
        }
    }
}

// ---------------------------------------------------------------- plain tests

#[test]
fn server_frame_with_agent_text_delta_is_flat() {
    let frame = ServerFrame {
        seq: 42,
        session_id: "sess-1".into(),
        ephemeral: false,
        event: ServerEvent::Agent(AgentEvent::TextDelta {
            conversation_id: "conv-1".into(),
            delta: "héllo\n".into(),
        }),
    };
    let text = frame.to_json();
    let value: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        value,
        json!({
            "seq": 42,
            "session_id": "sess-1",
            "type": "text_delta",
            "conversation_id": "conv-1",
            "delta": "héllo\n",
        })
    );
    let back: ServerFrame = serde_json::from_str(&text).unwrap();
    assert_eq!(back, frame);
    // The same JSON written by hand, in another key order, decodes too.
    let hand = r#"{"delta":"héllo\n","type":"text_delta","conversation_id":"conv-1","session_id":"sess-1","seq":42}"#;
    assert_eq!(serde_json::from_str::<ServerFrame>(hand).unwrap(), frame);
}

#[test]
fn ephemeral_is_written_only_when_set() {
    let mut frame = ServerFrame {
        seq: 1,
        session_id: "s".into(),
        ephemeral: false,
        event: ServerEvent::Agent(AgentEvent::Pong { id: json!(5) }),
    };
    assert!(!frame.to_json().contains("ephemeral"));
    frame.ephemeral = true;
    let value: Value = serde_json::from_str(&frame.to_json()).unwrap();
    assert_eq!(value["ephemeral"], json!(true));
    assert_eq!(
        serde_json::from_str::<ServerFrame>(&frame.to_json()).unwrap(),
        frame
    );
}

#[test]
fn error_kinds_for_hand_written_garbage() {
    assert!(matches!(
        ClientFrame::decode(""),
        Err(DecodeError::NotJson(_))
    ));
    assert!(matches!(
        ClientFrame::decode("{"),
        Err(DecodeError::NotJson(_))
    ));
    assert!(matches!(
        ClientFrame::decode("[]"),
        Err(DecodeError::NoType)
    ));
    assert!(matches!(
        ClientFrame::decode(r#"{"type":7}"#),
        Err(DecodeError::NoType)
    ));
    assert!(matches!(
        ClientFrame::decode(r#"{"type":"nope"}"#),
        Err(DecodeError::UnknownType(t)) if t == "nope"
    ));
    assert!(matches!(
        ClientFrame::decode(r#"{"type":"message"}"#),
        Err(DecodeError::Malformed { kind, .. }) if kind == "message"
    ));
    assert!(matches!(
        AgentEvent::decode_line(r#"{"type":"finish","conversation_id":1}"#),
        Err(DecodeError::Malformed { .. })
    ));
    // A 1000-level nesting bomb is refused, not a stack overflow.
    let bomb = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    assert!(matches!(
        RunnerToGateway::decode(&bomb),
        Err(DecodeError::NotJson(_))
    ));
}

#[test]
fn sandbox_settings_default_is_what_an_empty_object_decodes_to() {
    let decoded: aishell_protocol::runner::SandboxSettings = serde_json::from_str("{}").unwrap();
    assert_eq!(decoded, Default::default());
}
