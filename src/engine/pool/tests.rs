use std::time::Duration;

use super::*;
use crate::engine::scripted::{ScriptedEngine, Step};
use crate::engine::{EngineEvent, EngineInput, ErrorKind, Role, Stage, TurnEndReason};

fn settings() -> PoolSettings {
    PoolSettings {
        queue_max: 2,
        queue_timeout: Duration::from_secs(60),
        failover: true,
        failure_cooldown: Duration::from_secs(30),
    }
}

fn spec(name: &str, engine: Arc<dyn Engine>, max_concurrent: u32, priority: i32) -> InstanceSpec {
    InstanceSpec {
        name: name.to_owned(),
        engine,
        max_concurrent,
        priority,
    }
}

fn idle() -> Arc<dyn Engine> {
    Arc::new(ScriptedEngine::new(vec![Step::AwaitClose]))
}

fn placed(admission: Admission) -> Slot {
    match admission {
        Admission::Placed(slot) => slot,
        other => panic!("expected a place, got {other:?}"),
    }
}

fn queued(admission: Admission) -> Entry {
    match admission {
        Admission::Queued(entry) => entry,
        other => panic!("expected to wait, got {other:?}"),
    }
}

/// An engine whose service throttles: every start is refused.
struct Throttled;

impl Engine for Throttled {
    fn name(&self) -> &'static str {
        "throttled"
    }

    fn start(&self, _options: ConversationOptions) -> Result<EngineSession, StartError> {
        Err(StartError::Busy {
            retry_after: Duration::from_secs(20),
            message: "429".into(),
        })
    }
}

#[tokio::test(start_paused = true)]
async fn conversations_fill_instances_in_priority_order_then_wait_their_turn() {
    // Written out of order: priority decides.
    let pool = Pool::new(
        vec![spec("west", idle(), 1, 1), spec("east", idle(), 1, 0)],
        settings(),
    );
    let want = Want::default();
    let first = placed(pool.enter(&want));
    assert_eq!(first.instance().name(), "east");
    let second = placed(pool.enter(&want));
    assert_eq!(second.instance().name(), "west");
    let mut third = queued(pool.enter(&want));
    let mut fourth = queued(pool.enter(&want));
    assert_eq!((third.position(), fourth.position()), (1, 2));
    assert!(matches!(pool.enter(&want), Admission::Full));
    assert_eq!(pool.counters().queue_full.load(Ordering::Relaxed), 1);

    drop(second);
    let slot = match third.next().await {
        Waited::Placed(slot) => slot,
        other => panic!("expected a place, got {other:?}"),
    };
    assert_eq!(slot.instance().name(), "west");
    assert!(matches!(fourth.next().await, Waited::Moved(1)));
    assert_eq!(pool.waiting(), 1);
    // Leaving the queue frees its place in it.
    drop(fourth);
    assert_eq!(pool.waiting(), 0);
    drop((first, slot));
    assert!(pool.instances().iter().all(|i| i.active() == 0));
}

#[tokio::test(start_paused = true)]
async fn a_wait_ends_at_the_queue_timeout() {
    let pool = Pool::new(vec![spec("only", idle(), 1, 0)], settings());
    let _held = placed(pool.enter(&Want::default()));
    let mut entry = queued(pool.enter(&Want::default()));
    assert!(matches!(entry.next().await, Waited::TimedOut));
    assert_eq!(pool.counters().queue_timeouts.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_for_one_engine_does_not_hold_up_another() {
    let pool = Pool::new(
        vec![spec("east", idle(), 1, 0), spec("backup", idle(), 1, 1)],
        settings(),
    );
    let east = Want {
        engine: "east".into(),
        voice: String::new(),
    };
    let _busy = placed(pool.enter(&east));
    let _waiting = queued(pool.enter(&east));
    // The backup has room: an unchoosy newcomer still waits behind the
    // first waiter, but the dispatch places it there at once.
    let mut any = queued(pool.enter(&Want::default()));
    match any.next().await {
        Waited::Placed(slot) => assert_eq!(slot.instance().name(), "backup"),
        other => panic!("expected a place, got {other:?}"),
    }
}

#[test]
fn asking_for_an_unknown_engine_or_voice_is_refused_with_the_choices() {
    let pool = Pool::new(vec![spec("east", idle(), 0, 0)], settings());
    let error = pool
        .check(&Want {
            engine: "west".into(),
            voice: String::new(),
        })
        .expect_err("no such engine");
    assert!(error.to_string().contains("east"), "{error}");
    // The scripted engine takes any voice; an engine by kind works too.
    let by_kind = Want {
        engine: "scripted".into(),
        voice: "lupe".into(),
    };
    assert_eq!(pool.check(&by_kind), Ok(()));
}

#[tokio::test(start_paused = true)]
async fn a_throttling_instance_cools_down_and_conversations_go_elsewhere() {
    let pool = Pool::new(
        vec![
            spec("east", Arc::new(Throttled), 0, 0),
            spec("west", idle(), 0, 1),
        ],
        settings(),
    );
    let slot = placed(pool.enter(&Want::default()));
    assert_eq!(slot.instance().name(), "east");
    let started = pool
        .start(slot, &Want::default(), ConversationOptions::default())
        .expect("the next instance starts it");
    assert_eq!(started.instance.name(), "west");
    let east = &pool.instances()[0];
    assert_eq!(east.counters().refused.load(Ordering::Relaxed), 1);
    assert_eq!(east.active(), 0);
    assert!(east.cooling().is_some());
    // While it cools down, new conversations skip it.
    let slot = placed(pool.enter(&Want::default()));
    assert_eq!(slot.instance().name(), "west");
    tokio::time::advance(Duration::from_secs(21)).await;
    let slot = placed(pool.enter(&Want::default()));
    assert_eq!(slot.instance().name(), "east");
}

async fn next_event(session: &mut EngineSession) -> EngineEvent {
    tokio::time::timeout(Duration::from_secs(5), session.events.recv())
        .await
        .expect("an event in time")
        .expect("the relay is running")
}

#[tokio::test]
async fn a_failed_engine_hands_the_conversation_over_at_a_turn_boundary() {
    let transcript = |role, text: &str, turn_id| {
        Step::Emit(EngineEvent::Transcript {
            role,
            text: text.into(),
            stage: Stage::Final,
            turn_id,
        })
    };
    let ready = Step::Emit(EngineEvent::Ready {
        engine: "scripted".into(),
        model: "m".into(),
        voice: "v".into(),
    });
    let first = Arc::new(ScriptedEngine::new(vec![
        ready.clone(),
        transcript(Role::User, "¿dónde está la biblioteca?", 1),
        transcript(Role::Assistant, "En el edificio central.", 1),
        Step::Emit(EngineEvent::TurnEnd {
            turn_id: 1,
            reason: TurnEndReason::Completed,
        }),
        transcript(Role::User, "¿y el horario?", 2),
        Step::Emit(EngineEvent::Error {
            kind: ErrorKind::Fatal,
            message: "the stream was reset".into(),
        }),
    ]));
    let second = Arc::new(ScriptedEngine::new(vec![
        ready,
        transcript(Role::Assistant, "Abre a las ocho.", 1),
        Step::Emit(EngineEvent::TurnEnd {
            turn_id: 1,
            reason: TurnEndReason::Completed,
        }),
    ]));
    let pool = Pool::new(
        vec![
            spec("east", first.clone(), 1, 0),
            spec("west", second.clone(), 1, 1),
        ],
        settings(),
    );
    let want = Want::default();
    let slot = placed(pool.enter(&want));
    let options = ConversationOptions {
        language: "es".into(),
        voice: String::new(),
        history: Vec::new(),
    };
    let mut session = pool.start(slot, &want, options).expect("starts").session;
    match next_event(&mut session).await {
        EngineEvent::Ready { engine, .. } => assert_eq!(engine, "east"),
        other => panic!("expected ready, got {other:?}"),
    }
    for _ in 0..4 {
        next_event(&mut session).await;
    }
    // The turn the failure cut short ends as an error, then the move.
    assert_eq!(
        next_event(&mut session).await,
        EngineEvent::TurnEnd {
            turn_id: 2,
            reason: TurnEndReason::Error
        }
    );
    match next_event(&mut session).await {
        EngineEvent::Moved {
            engine, generation, ..
        } => assert_eq!((engine.as_str(), generation), ("west", 1)),
        other => panic!("expected the move, got {other:?}"),
    }
    // Turn numbers carry on after the old engine's.
    match next_event(&mut session).await {
        EngineEvent::Transcript { text, turn_id, .. } => {
            assert_eq!((text.as_str(), turn_id), ("Abre a las ocho.", 4));
        }
        other => panic!("expected the reply, got {other:?}"),
    }
    let history = &second.received().started[0].history;
    assert_eq!(
        history,
        &[
            (Role::User, "¿dónde está la biblioteca?".to_owned()),
            (Role::Assistant, "En el edificio central.".to_owned()),
            (Role::User, "¿y el horario?".to_owned()),
        ]
    );
    let (east, west) = (&pool.instances()[0], &pool.instances()[1]);
    assert_eq!(east.counters().failed.load(Ordering::Relaxed), 1);
    assert_eq!((east.active(), west.active()), (0, 1));
    assert!(east.cooling().is_some());
    session
        .input
        .send(EngineInput::Close)
        .await
        .expect("the relay reads");
    next_event(&mut session).await; // TurnEnd
    assert_eq!(next_event(&mut session).await, EngineEvent::Closed);
    assert_eq!(session.events.recv().await, None);
    assert_eq!(west.active(), 0);
}

#[tokio::test]
async fn without_room_elsewhere_the_failure_reaches_the_conversation() {
    // The usage it reports after failing was spent: it still arrives.
    let late = crate::usage::UsageDelta {
        cost_micro_usd: 7,
        ..crate::usage::UsageDelta::default()
    };
    let failing = Arc::new(ScriptedEngine::new(vec![
        Step::Emit(EngineEvent::Error {
            kind: ErrorKind::Fatal,
            message: "invalid key".into(),
        }),
        Step::Emit(EngineEvent::Usage(late)),
    ]));
    let pool = Pool::new(vec![spec("only", failing, 1, 0)], settings());
    let want = Want::default();
    let slot = placed(pool.enter(&want));
    let mut session = pool
        .start(slot, &want, ConversationOptions::default())
        .expect("starts")
        .session;
    assert!(matches!(
        next_event(&mut session).await,
        EngineEvent::Error {
            kind: ErrorKind::Fatal,
            ..
        }
    ));
    assert_eq!(next_event(&mut session).await, EngineEvent::Closed);
    assert_eq!(next_event(&mut session).await, EngineEvent::Usage(late));
    assert_eq!(session.events.recv().await, None);
    let only = &pool.instances()[0];
    assert_eq!(only.active(), 0);
    assert_eq!(only.counters().cost_micro_usd.load(Ordering::Relaxed), 7);
}
