//! Tests of the Prometheus text the metrics listener serves.

use super::*;

#[test]
fn the_text_holds_counters_queue_depths_and_store_health() {
    let m = Metrics::default();
    m.submitted.add(3);
    let depths = [(proto::AreaId::new("southvale").unwrap(), 7)];
    let text = m.render(&depths, true);
    assert!(
        text.contains("\ngateway_messages_submitted_total 3\n"),
        "{text}"
    );
    assert!(
        text.contains("gateway_peer_queue_depth{peer=\"southvale\"} 7"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE gateway_store_ok gauge\ngateway_store_ok 1\n"),
        "{text}"
    );
    assert!(m.render(&[], false).contains("\ngateway_store_ok 0\n"));
    let waiting = |m: &Metrics| {
        m.render(&[], true).contains(&format!(
            "\ngateway_inbox_long_polls_waiting {}\n",
            m.inbox_waiting.get()
        ))
    };
    let (a, b) = (m.inbox_waiting.hold(), m.inbox_waiting.hold());
    assert_eq!(m.inbox_waiting.get(), 2);
    assert!(waiting(&m));
    drop((a, b));
    assert_eq!(m.inbox_waiting.get(), 0);
    assert!(waiting(&m));
}
