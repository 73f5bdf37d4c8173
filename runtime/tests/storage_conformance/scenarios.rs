//! The scenarios every backend must pass. Each takes a fresh storage; the
//! memory backend is the reference semantics.

use std::collections::BTreeMap;
use std::sync::Arc;

use flotilla::StorageError;
use flotilla::storage::{
    Completion, CompletionOutcome, MessageId, MessageStorage, SaveOutcome, ShardFilter,
    StoredMessage, StoredReply, UnprocessedQuery, WriteBatch, WriteOutcome,
};

use super::fixtures::*;

pub(crate) async fn save_then_read_unprocessed_preserves_every_field(
    storage: Arc<dyn MessageStorage>,
) {
    let mut full = keyed(7, "acct-ü/1", "transfer/42%");
    full.tag = "withdraw".to_owned();
    full.payload = vec![0, 1, 2, 0xff, 0xc1];
    full.headers = BTreeMap::from([
        ("traceparent".to_owned(), "00-abc-def-01".to_owned()),
        ("sender".to_owned(), "runner-a".to_owned()),
    ]);
    full.deliver_at = Some(1_700_000_000_500);
    full.created_at = 1_700_000_000_123;
    full.address.shard = flotilla::ShardId::new("payments", 4_000_000_000);
    let plain = message(8, "acct-2");

    let outcome = save(&*storage, vec![full.clone(), plain.clone()]).await;
    assert_eq!(outcome.saves, vec![SaveOutcome::Saved, SaveOutcome::Saved]);
    assert!(outcome.completions.is_empty());

    let read = storage
        .unprocessed(all_ready_at(1_700_000_000_500))
        .await
        .unwrap();
    assert_eq!(read, vec![stored(full), stored(plain)]);
}

fn stored(m: flotilla::storage::NewMessage) -> StoredMessage {
    StoredMessage {
        id: m.id,
        address: m.address,
        tag: m.tag,
        key: m.key,
        payload: m.payload,
        headers: m.headers,
        deliver_at: m.deliver_at,
        created_at: m.created_at,
    }
}

pub(crate) async fn unprocessed_is_in_id_order_and_pages_with_after_and_limit(
    storage: Arc<dyn MessageStorage>,
) {
    // Saved out of order, in two batches.
    save(&*storage, vec![message(30, "a"), message(10, "b")]).await;
    save(
        &*storage,
        vec![message(50, "c"), message(20, "a"), message(40, "b")],
    )
    .await;

    assert_eq!(
        unprocessed_ids(&*storage, 0).await,
        vec![10, 20, 30, 40, 50]
    );
    let page = |after: Option<i64>, limit| {
        let storage = storage.clone();
        async move {
            storage
                .unprocessed(UnprocessedQuery {
                    ready_at: 0,
                    after: after.map(MessageId),
                    limit,
                    shards: ShardFilter::All,
                })
                .await
                .unwrap()
                .iter()
                .map(|m| m.id.0)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(None, 2).await, vec![10, 20]);
    assert_eq!(page(Some(20), 2).await, vec![30, 40]);
    assert_eq!(page(Some(40), 2).await, vec![50]);
    assert_eq!(page(Some(50), 2).await, Vec::<i64>::new());
    assert_eq!(page(Some(25), 100).await, vec![30, 40, 50]);
    assert_eq!(page(None, 0).await, Vec::<i64>::new());
}

pub(crate) async fn a_future_delivery_becomes_ready_at_its_instant(
    storage: Arc<dyn MessageStorage>,
) {
    let at = 1_700_000_100_000;
    let mut later = message(2, "a");
    later.deliver_at = Some(at);
    let mut much_later = message(3, "a");
    much_later.deliver_at = Some(at + 60_000);
    save(&*storage, vec![message(1, "a"), later, much_later]).await;

    assert_eq!(unprocessed_ids(&*storage, at - 1).await, vec![1]);
    assert_eq!(unprocessed_ids(&*storage, at).await, vec![1, 2]);
    assert_eq!(unprocessed_ids(&*storage, at + 60_000).await, vec![1, 2, 3]);

    assert_eq!(
        storage.next_delivery(0, &ShardFilter::All).await.unwrap(),
        Some(at)
    );
    assert_eq!(
        storage
            .next_delivery(at - 1, &ShardFilter::All)
            .await
            .unwrap(),
        Some(at)
    );
    assert_eq!(
        storage.next_delivery(at, &ShardFilter::All).await.unwrap(),
        Some(at + 60_000)
    );
    assert_eq!(
        storage
            .next_delivery(at + 60_000, &ShardFilter::All)
            .await
            .unwrap(),
        None
    );

    // A processed message is no longer scheduled.
    complete(&*storage, vec![completion(2, b"done")]).await;
    assert_eq!(
        storage.next_delivery(0, &ShardFilter::All).await.unwrap(),
        Some(at + 60_000)
    );
}

pub(crate) async fn next_delivery_is_none_without_scheduled_messages(
    storage: Arc<dyn MessageStorage>,
) {
    assert_eq!(
        storage.next_delivery(0, &ShardFilter::All).await.unwrap(),
        None
    );
    save(&*storage, vec![message(1, "a")]).await;
    assert_eq!(
        storage.next_delivery(0, &ShardFilter::All).await.unwrap(),
        None
    );
}

pub(crate) async fn a_duplicate_key_returns_the_stored_message_then_its_reply(
    storage: Arc<dyn MessageStorage>,
) {
    let outcome = save(&*storage, vec![keyed(1, "a", "t-1")]).await;
    assert_eq!(outcome.saves, vec![SaveOutcome::Saved]);

    let outcome = save(&*storage, vec![keyed(2, "a", "t-1")]).await;
    assert_eq!(
        outcome.saves,
        vec![SaveOutcome::Duplicate {
            id: MessageId(1),
            reply: None
        }]
    );

    complete(&*storage, vec![completion(1, b"reply-1")]).await;
    let outcome = save(&*storage, vec![keyed(3, "a", "t-1")]).await;
    assert_eq!(
        outcome.saves,
        vec![SaveOutcome::Duplicate {
            id: MessageId(1),
            reply: Some(StoredReply::Ok(b"reply-1".to_vec()))
        }]
    );
    // Neither duplicate was stored.
    assert_eq!(unprocessed_ids(&*storage, 0).await, Vec::<i64>::new());
    assert_eq!(storage.reply(MessageId(2)).await.unwrap(), None);
}

pub(crate) async fn duplicate_keys_within_one_batch_store_the_first(
    storage: Arc<dyn MessageStorage>,
) {
    let outcome = save(
        &*storage,
        vec![
            keyed(1, "a", "k"),
            keyed(2, "a", "k"),
            keyed(3, "b", "k"), // another entity: another key
            keyed(4, "a", "k"),
        ],
    )
    .await;
    let dup = SaveOutcome::Duplicate {
        id: MessageId(1),
        reply: None,
    };
    assert_eq!(
        outcome.saves,
        vec![SaveOutcome::Saved, dup.clone(), SaveOutcome::Saved, dup]
    );
    assert_eq!(unprocessed_ids(&*storage, 0).await, vec![1, 3]);
}

pub(crate) async fn messages_without_a_key_are_never_duplicates(storage: Arc<dyn MessageStorage>) {
    let first = message(1, "a");
    let second = flotilla::storage::NewMessage {
        id: MessageId(2),
        ..first.clone()
    };
    let outcome = save(&*storage, vec![first.clone(), second.clone()]).await;
    assert_eq!(outcome.saves, vec![SaveOutcome::Saved, SaveOutcome::Saved]);
    let third = flotilla::storage::NewMessage {
        id: MessageId(3),
        ..first
    };
    assert_eq!(
        save(&*storage, vec![third]).await.saves,
        vec![SaveOutcome::Saved]
    );
    assert_eq!(unprocessed_ids(&*storage, 0).await, vec![1, 2, 3]);
}

pub(crate) async fn a_completion_records_reply_and_state_together(
    storage: Arc<dyn MessageStorage>,
) {
    save(&*storage, vec![message(1, "a"), message(2, "a")]).await;
    assert_eq!(storage.reply(MessageId(1)).await.unwrap(), None);

    let outcome = complete(
        &*storage,
        vec![Completion {
            state: Some(state("a", b"balance=100")),
            ..completion(1, b"100")
        }],
    )
    .await;
    assert_eq!(outcome.completions, vec![CompletionOutcome::Recorded]);
    assert_eq!(
        storage.reply(MessageId(1)).await.unwrap(),
        Some(StoredReply::Ok(b"100".to_vec()))
    );
    assert_eq!(
        storage.load_state(ACCOUNT, "a").await.unwrap(),
        Some(b"balance=100".to_vec())
    );
    assert_eq!(unprocessed_ids(&*storage, 0).await, vec![2]);

    // The next completion replaces the state.
    complete(
        &*storage,
        vec![Completion {
            state: Some(state("a", b"balance=150")),
            ..completion(2, b"150")
        }],
    )
    .await;
    assert_eq!(
        storage.load_state(ACCOUNT, "a").await.unwrap(),
        Some(b"balance=150".to_vec())
    );
}

pub(crate) async fn every_reply_kind_round_trips(storage: Arc<dyn MessageStorage>) {
    let replies = [
        StoredReply::Ok(Vec::new()),
        StoredReply::Panicked("index out of bounds".to_owned()),
        StoredReply::EffectsFailed("UNIQUE constraint failed".to_owned()),
        StoredReply::Rejected("unknown rpc".to_owned()),
    ];
    let saves = (1..=replies.len() as i64)
        .map(|id| message(id, "a"))
        .collect();
    save(&*storage, saves).await;
    let completions = replies
        .iter()
        .zip(1..)
        .map(|(reply, id)| Completion {
            message_id: MessageId(id),
            reply: reply.clone(),
            state: None,
            effects: Vec::new(),
            fence: None,
        })
        .collect();
    complete(&*storage, completions).await;
    for (reply, id) in replies.iter().zip(1..) {
        assert_eq!(
            storage.reply(MessageId(id)).await.unwrap().as_ref(),
            Some(reply)
        );
    }
}

pub(crate) async fn a_second_completion_is_already_processed_and_leaves_state_untouched(
    storage: Arc<dyn MessageStorage>,
) {
    save(&*storage, vec![message(1, "a")]).await;
    complete(
        &*storage,
        vec![Completion {
            state: Some(state("a", b"first")),
            ..completion(1, b"first reply")
        }],
    )
    .await;

    let outcome = complete(
        &*storage,
        vec![Completion {
            state: Some(state("a", b"second")),
            ..completion(1, b"second reply")
        }],
    )
    .await;
    assert_eq!(
        outcome.completions,
        vec![CompletionOutcome::AlreadyProcessed(Some(StoredReply::Ok(
            b"first reply".to_vec()
        )))]
    );
    assert_eq!(
        storage.reply(MessageId(1)).await.unwrap(),
        Some(StoredReply::Ok(b"first reply".to_vec()))
    );
    assert_eq!(
        storage.load_state(ACCOUNT, "a").await.unwrap(),
        Some(b"first".to_vec())
    );
}

pub(crate) async fn completing_an_unknown_message_writes_nothing(storage: Arc<dyn MessageStorage>) {
    let outcome = complete(
        &*storage,
        vec![Completion {
            state: Some(state("ghost", b"boo")),
            ..completion(404, b"?")
        }],
    )
    .await;
    assert_eq!(
        outcome.completions,
        vec![CompletionOutcome::AlreadyProcessed(None)]
    );
    assert_eq!(storage.reply(MessageId(404)).await.unwrap(), None);
    assert_eq!(storage.load_state(ACCOUNT, "ghost").await.unwrap(), None);
}

pub(crate) async fn one_batch_completes_several_entities(storage: Arc<dyn MessageStorage>) {
    save(
        &*storage,
        vec![
            message(1, "a"),
            message(2, "b"),
            message(3, "c"),
            message(4, "d"),
        ],
    )
    .await;
    complete(&*storage, vec![completion(4, b"early")]).await;

    let outcome = complete(
        &*storage,
        vec![
            Completion {
                state: Some(state("a", b"A")),
                ..completion(1, b"r1")
            },
            completion(4, b"late"),
            Completion {
                state: Some(state("b", b"B")),
                ..completion(2, b"r2")
            },
            completion(99, b"unknown"),
            Completion {
                state: Some(state("c", b"C")),
                ..completion(3, b"r3")
            },
        ],
    )
    .await;
    assert_eq!(
        outcome.completions,
        vec![
            CompletionOutcome::Recorded,
            CompletionOutcome::AlreadyProcessed(Some(StoredReply::Ok(b"early".to_vec()))),
            CompletionOutcome::Recorded,
            CompletionOutcome::AlreadyProcessed(None),
            CompletionOutcome::Recorded,
        ]
    );
    for (id, entity, reply, st) in [
        (1, "a", "r1", "A"),
        (2, "b", "r2", "B"),
        (3, "c", "r3", "C"),
    ] {
        assert_eq!(
            storage.reply(MessageId(id)).await.unwrap(),
            Some(StoredReply::Ok(reply.as_bytes().to_vec()))
        );
        assert_eq!(
            storage.load_state(ACCOUNT, entity).await.unwrap(),
            Some(st.as_bytes().to_vec())
        );
    }
    assert_eq!(unprocessed_ids(&*storage, 0).await, Vec::<i64>::new());
}

pub(crate) async fn a_message_saved_and_completed_in_one_batch_is_processed(
    storage: Arc<dyn MessageStorage>,
) {
    let outcome = storage
        .write(WriteBatch {
            saves: vec![keyed(1, "a", "k"), message(2, "a")],
            completions: vec![completion(1, b"r")],
        })
        .await
        .unwrap();
    assert_eq!(
        outcome,
        WriteOutcome {
            saves: vec![SaveOutcome::Saved, SaveOutcome::Saved],
            completions: vec![CompletionOutcome::Recorded],
        }
    );
    assert_eq!(unprocessed_ids(&*storage, 0).await, vec![2]);
    assert_eq!(
        save(&*storage, vec![keyed(3, "a", "k")]).await.saves,
        vec![SaveOutcome::Duplicate {
            id: MessageId(1),
            reply: Some(StoredReply::Ok(b"r".to_vec()))
        }]
    );
}

pub(crate) async fn an_empty_batch_writes_nothing(storage: Arc<dyn MessageStorage>) {
    let outcome = storage.write(WriteBatch::default()).await.unwrap();
    assert_eq!(outcome, WriteOutcome::default());
    assert_eq!(unprocessed_ids(&*storage, 0).await, Vec::<i64>::new());
}

pub(crate) async fn purge_removes_old_processed_messages_and_frees_their_keys(
    storage: Arc<dyn MessageStorage>,
) {
    save(
        &*storage,
        vec![keyed(1, "a", "k1"), keyed(2, "a", "k2"), message(3, "a")],
    )
    .await;
    let before_completion = now_ms() - 1;
    complete(&*storage, vec![completion(1, b"r1"), completion(3, b"r3")]).await;

    // Nothing was processed before `before_completion`.
    assert_eq!(storage.purge_processed(before_completion).await.unwrap(), 0);
    assert!(storage.reply(MessageId(1)).await.unwrap().is_some());

    let purged = storage.purge_processed(now_ms() + 1).await.unwrap();
    assert_eq!(purged, 2);
    assert_eq!(storage.reply(MessageId(1)).await.unwrap(), None);
    assert_eq!(storage.reply(MessageId(3)).await.unwrap(), None);
    // The unprocessed message stays, and so does its key.
    assert_eq!(unprocessed_ids(&*storage, 0).await, vec![2]);
    assert_eq!(
        save(&*storage, vec![keyed(20, "a", "k2")]).await.saves,
        vec![SaveOutcome::Duplicate {
            id: MessageId(2),
            reply: None
        }]
    );
    // The purged key is free: the dedup window ended.
    assert_eq!(
        save(&*storage, vec![keyed(10, "a", "k1")]).await.saves,
        vec![SaveOutcome::Saved]
    );
    assert_eq!(storage.purge_processed(now_ms() + 1).await.unwrap(), 0);
}

pub(crate) async fn entity_state_survives_purge(storage: Arc<dyn MessageStorage>) {
    save(&*storage, vec![message(1, "a")]).await;
    complete(
        &*storage,
        vec![Completion {
            state: Some(state("a", b"kept")),
            ..completion(1, b"r")
        }],
    )
    .await;
    assert_eq!(storage.purge_processed(now_ms() + 1).await.unwrap(), 1);
    assert_eq!(
        storage.load_state(ACCOUNT, "a").await.unwrap(),
        Some(b"kept".to_vec())
    );
}

pub(crate) async fn load_state_of_an_unknown_entity_is_none(storage: Arc<dyn MessageStorage>) {
    assert_eq!(storage.load_state(ACCOUNT, "nobody").await.unwrap(), None);
    assert_eq!(storage.load_state("Other", "a").await.unwrap(), None);
    assert_eq!(storage.reply(MessageId(1)).await.unwrap(), None);
}

pub(crate) async fn a_closed_storage_refuses_every_call(storage: Arc<dyn MessageStorage>) {
    save(&*storage, vec![message(1, "a")]).await;
    storage.close().await;
    fn closed<T: std::fmt::Debug>(result: Result<T, StorageError>) {
        assert!(
            matches!(result, Err(StorageError::Closed)),
            "expected Err(Closed), got {result:?}"
        );
    }
    closed(
        storage
            .write(WriteBatch {
                saves: vec![message(2, "a")],
                completions: Vec::new(),
            })
            .await,
    );
    closed(
        storage
            .write(WriteBatch {
                saves: Vec::new(),
                completions: vec![completion(1, b"r")],
            })
            .await,
    );
    closed(storage.unprocessed(all_ready_at(0)).await);
    closed(storage.next_delivery(0, &ShardFilter::All).await);
    closed(storage.reply(MessageId(1)).await);
    closed(storage.load_state(ACCOUNT, "a").await);
    closed(storage.purge_processed(now_ms()).await);
    // Closing twice is harmless.
    storage.close().await;
}

/// Effects commit with their completion, in order; the effects of a
/// completion that finds its message processed are not applied.
pub(crate) async fn effects_commit_with_their_completion(fixture: &Fixture) {
    fixture.create_audit_table().await;
    let storage = fixture.storage();
    save(&*storage, vec![message(1, "a"), message(2, "b")]).await;
    let outcome = complete(
        &*storage,
        vec![
            Completion {
                effects: vec![fixture.audit(1, "first"), fixture.audit(1, "second")],
                state: Some(state("a", b"A")),
                ..completion(1, b"r1")
            },
            Completion {
                effects: vec![fixture.audit(2, "third")],
                ..completion(2, b"r2")
            },
        ],
    )
    .await;
    assert_eq!(
        outcome.completions,
        vec![CompletionOutcome::Recorded, CompletionOutcome::Recorded]
    );
    let expected = vec![
        (1, "first".to_owned()),
        (1, "second".to_owned()),
        (2, "third".to_owned()),
    ];
    assert_eq!(fixture.audit_rows().await, expected);

    // A redelivered completion: its effects must not run again.
    let outcome = complete(
        &*storage,
        vec![Completion {
            effects: vec![fixture.audit(1, "again")],
            ..completion(1, b"r1 again")
        }],
    )
    .await;
    assert!(matches!(
        outcome.completions[..],
        [CompletionOutcome::AlreadyProcessed(Some(_))]
    ));
    assert_eq!(fixture.audit_rows().await, expected);
}

pub(crate) async fn the_same_message_completed_twice_in_one_batch_is_recorded_once(
    storage: Arc<dyn MessageStorage>,
) {
    save(&*storage, vec![message(1, "a")]).await;
    let outcome = complete(
        &*storage,
        vec![
            Completion {
                state: Some(state("a", b"first")),
                ..completion(1, b"first")
            },
            Completion {
                state: Some(state("a", b"second")),
                ..completion(1, b"second")
            },
        ],
    )
    .await;
    assert_eq!(
        outcome.completions,
        vec![
            CompletionOutcome::Recorded,
            CompletionOutcome::AlreadyProcessed(Some(StoredReply::Ok(b"first".to_vec()))),
        ]
    );
    assert_eq!(
        storage.load_state(ACCOUNT, "a").await.unwrap(),
        Some(b"first".to_vec())
    );
}

pub(crate) async fn the_last_completion_of_an_entity_in_a_batch_leaves_its_state(
    storage: Arc<dyn MessageStorage>,
) {
    save(
        &*storage,
        vec![message(1, "a"), message(2, "a"), message(3, "b")],
    )
    .await;
    complete(
        &*storage,
        vec![
            Completion {
                state: Some(state("a", b"one")),
                ..completion(1, b"1")
            },
            Completion {
                state: Some(state("b", b"b")),
                ..completion(3, b"3")
            },
            Completion {
                state: Some(state("a", b"two")),
                ..completion(2, b"2")
            },
        ],
    )
    .await;
    assert_eq!(
        storage.load_state(ACCOUNT, "a").await.unwrap(),
        Some(b"two".to_vec())
    );
}

/// Batches as large as group commit forms under load, with duplicates and
/// unknown ids mixed in: every outcome comes back in batch order.
pub(crate) async fn large_batches_keep_every_outcome_in_order(storage: Arc<dyn MessageStorage>) {
    save(&*storage, vec![keyed(1, "a", "stored")]).await;
    let mut saves = Vec::new();
    let mut expected = Vec::new();
    for id in 100..400_i64 {
        if id % 10 == 5 {
            // The key of the message saved just before, in this batch.
            saves.push(keyed(id, "a", &(id - 1).to_string()));
            expected.push(SaveOutcome::Duplicate {
                id: MessageId(id - 1),
                reply: None,
            });
        } else if id % 50 == 7 {
            saves.push(keyed(id, "a", "stored"));
            expected.push(SaveOutcome::Duplicate {
                id: MessageId(1),
                reply: None,
            });
        } else {
            saves.push(keyed(id, "a", &id.to_string()));
            expected.push(SaveOutcome::Saved);
        }
    }
    assert_eq!(save(&*storage, saves).await.saves, expected);

    let mut completions = Vec::new();
    let mut expected = Vec::new();
    for id in 100..400_i64 {
        completions.push(Completion {
            state: Some(state(&format!("e{}", id % 7), &id.to_le_bytes())),
            ..completion(id, &id.to_le_bytes())
        });
        expected.push(if id % 10 == 5 || id % 50 == 7 {
            CompletionOutcome::AlreadyProcessed(None) // never stored
        } else {
            CompletionOutcome::Recorded
        });
    }
    assert_eq!(complete(&*storage, completions).await.completions, expected);
    assert_eq!(unprocessed_ids(&*storage, 0).await, vec![1]);
    assert_eq!(
        storage.reply(MessageId(399)).await.unwrap(),
        Some(StoredReply::Ok(399_i64.to_le_bytes().to_vec()))
    );
    // The state of e3 is that of its last recorded completion.
    let last_of_e3 = (100..400_i64)
        .filter(|id| id % 7 == 3 && id % 10 != 5 && id % 50 != 7)
        .max()
        .unwrap();
    assert_eq!(
        storage.load_state(ACCOUNT, "e3").await.unwrap(),
        Some(last_of_e3.to_le_bytes().to_vec())
    );
}

/// Completions with and without effects interleave; state follows batch order.
pub(crate) async fn mixed_completions_apply_state_in_batch_order(fixture: &Fixture) {
    fixture.create_audit_table().await;
    let storage = fixture.storage();
    save(
        &*storage,
        vec![
            message(1, "a"),
            message(2, "a"),
            message(3, "a"),
            message(4, "b"),
        ],
    )
    .await;
    let outcome = complete(
        &*storage,
        vec![
            Completion {
                state: Some(state("a", b"1")),
                ..completion(1, b"r1")
            },
            Completion {
                state: Some(state("a", b"2")),
                effects: vec![fixture.audit(2, "two")],
                ..completion(2, b"r2")
            },
            Completion {
                state: Some(state("a", b"3")),
                ..completion(3, b"r3")
            },
            Completion {
                state: Some(state("b", b"4")),
                effects: vec![fixture.audit(4, "four")],
                ..completion(4, b"r4")
            },
        ],
    )
    .await;
    assert_eq!(outcome.completions, vec![CompletionOutcome::Recorded; 4]);
    assert_eq!(
        storage.load_state(ACCOUNT, "a").await.unwrap(),
        Some(b"3".to_vec())
    );
    assert_eq!(
        storage.load_state(ACCOUNT, "b").await.unwrap(),
        Some(b"4".to_vec())
    );
    assert_eq!(
        fixture.audit_rows().await,
        vec![(2, "two".to_owned()), (4, "four".to_owned())]
    );
}

pub(crate) async fn a_shard_filter_limits_unprocessed_and_next_delivery(
    storage: Arc<dyn MessageStorage>,
) {
    let on = |id: i64, shard: flotilla::ShardId, deliver_at: Option<i64>| {
        let mut m = message(id, &format!("acct-{id}"));
        m.address.shard = shard;
        m.deliver_at = deliver_at;
        m
    };
    let mine = flotilla::ShardId::default_group(3);
    let also_mine = flotilla::ShardId::new("payments", 9);
    // Same index as `mine`, other group; and another index of the same group.
    let other_group = flotilla::ShardId::new("payments", 3);
    let other_index = flotilla::ShardId::default_group(4);
    save(
        &*storage,
        vec![
            on(1, mine.clone(), None),
            on(2, other_group.clone(), None),
            on(3, also_mine.clone(), None),
            on(4, other_index.clone(), None),
            on(5, mine.clone(), Some(2_000)),
            on(6, other_group.clone(), Some(1_500)),
            on(7, also_mine.clone(), Some(3_000)),
        ],
    )
    .await;
    let only = ShardFilter::Only(vec![mine.clone(), also_mine.clone()]);
    let read = |shards: ShardFilter, ready_at: i64| {
        let storage = storage.clone();
        async move {
            storage
                .unprocessed(UnprocessedQuery {
                    ready_at,
                    after: None,
                    limit: usize::MAX,
                    shards,
                })
                .await
                .expect("unprocessed")
                .iter()
                .map(|m| m.id.0)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(read(only.clone(), 1_000).await, vec![1, 3]);
    assert_eq!(read(only.clone(), 10_000).await, vec![1, 3, 5, 7]);
    assert_eq!(
        read(ShardFilter::All, 10_000).await,
        vec![1, 2, 3, 4, 5, 6, 7]
    );
    assert_eq!(
        read(ShardFilter::Only(Vec::new()), 10_000).await,
        Vec::<i64>::new()
    );
    assert_eq!(
        read(ShardFilter::Only(vec![other_group.clone()]), 10_000).await,
        vec![2, 6]
    );

    assert_eq!(storage.next_delivery(0, &only).await.unwrap(), Some(2_000));
    assert_eq!(
        storage.next_delivery(2_000, &only).await.unwrap(),
        Some(3_000)
    );
    assert_eq!(storage.next_delivery(3_000, &only).await.unwrap(), None);
    assert_eq!(
        storage.next_delivery(0, &ShardFilter::All).await.unwrap(),
        Some(1_500)
    );
    assert_eq!(
        storage
            .next_delivery(0, &ShardFilter::Only(Vec::new()))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        storage
            .next_delivery(0, &ShardFilter::Only(vec![other_index]))
            .await
            .unwrap(),
        None
    );
}
