//! Every message gets a tracing span; the runtime records metrics through the
//! `metrics` facade.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};

/// A span's name and its recorded fields.
type SpanRecord = (String, Vec<(String, String)>);

#[derive(Clone, Default)]
struct SpanLog(Arc<Mutex<Vec<SpanRecord>>>);

struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}

impl<S: tracing::Subscriber> Layer<S> for SpanLog {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: Context<'_, S>,
    ) {
        let mut fields = Fields(Vec::new());
        attrs.record(&mut fields);
        self.0
            .lock()
            .unwrap()
            .push((attrs.metadata().name().to_owned(), fields.0));
    }
}

/// One test installs both global hooks, so nothing races on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_has_a_span_and_the_runtime_records_metrics() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    let spans = SpanLog::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cluster = builder(Backend::Sqlite, &dir)
        .register::<Echo>()
        .register::<Ledger>()
        .start()
        .await
        .unwrap();
    for n in 0..5 {
        cluster.client::<Echo>("observed").ping(n).await.unwrap();
    }
    cluster
        .client::<Ledger>("observed")
        .apply(1, 3)
        .await
        .unwrap();

    let log = spans.0.lock().unwrap().clone();
    let messages: Vec<_> = log
        .iter()
        .filter(|(name, _)| name == "flotilla.message")
        .collect();
    assert_eq!(messages.len(), 6, "one span per message: {log:?}");
    let persisted = messages
        .iter()
        .find(|(_, f)| {
            f.iter()
                .any(|(k, v)| k == "delivery" && v == "\"persisted\"")
        })
        .expect("a span for the persisted message");
    let field = |k: &str| {
        persisted
            .1
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field("entity_type").as_deref(), Some("Ledger"));
    assert_eq!(field("entity_id").as_deref(), Some("observed"));
    assert_eq!(field("rpc").as_deref(), Some("\"apply\""));
    assert!(field("shard").is_some());

    let snapshot = snapshotter.snapshot().into_vec();
    let find = |kind: MetricKind, name: &str, labels: &[(&str, &str)]| {
        snapshot.iter().find(|(key, _, _, _)| {
            key.kind() == kind
                && key.key().name() == name
                && labels
                    .iter()
                    .all(|(k, v)| key.key().labels().any(|l| l.key() == *k && l.value() == *v))
        })
    };
    match find(
        MetricKind::Counter,
        "flotilla_messages_total",
        &[("entity_type", "Echo"), ("delivery", "volatile")],
    ) {
        Some((_, _, _, DebugValue::Counter(n))) => assert_eq!(*n, 5),
        other => panic!("volatile message counter missing: {other:?}"),
    }
    match find(
        MetricKind::Counter,
        "flotilla_messages_total",
        &[("entity_type", "Ledger"), ("delivery", "persisted")],
    ) {
        Some((_, _, _, DebugValue::Counter(n))) => assert_eq!(*n, 1),
        other => panic!("persisted message counter missing: {other:?}"),
    }
    match find(
        MetricKind::Histogram,
        "flotilla_handler_duration_seconds",
        &[("entity_type", "Echo")],
    ) {
        Some((_, _, _, DebugValue::Histogram(values))) => assert_eq!(values.len(), 5),
        other => panic!("handler latency histogram missing: {other:?}"),
    }
    match find(
        MetricKind::Gauge,
        "flotilla_active_entities",
        &[("entity_type", "Echo")],
    ) {
        Some((_, _, _, DebugValue::Gauge(v))) => assert_eq!(v.into_inner(), 1.0),
        other => panic!("active entities gauge missing: {other:?}"),
    }
    assert!(
        find(
            MetricKind::Gauge,
            "flotilla_mailbox_depth",
            &[("entity_type", "Echo")]
        )
        .is_some()
    );
    assert!(
        find(
            MetricKind::Histogram,
            "flotilla_group_commit_batch_size",
            &[]
        )
        .is_some()
    );
    cluster.shutdown().await;
}
