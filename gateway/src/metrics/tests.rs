//! Tests of the Prometheus text the metrics listener serves.

use super::*;

#[test]
fn the_text_holds_counters_queue_depths_and_store_health() {
    let m = Metrics::default();
    m.submitted.add(3);
    let depths = [crate::store::PeerQueue {
        peer: proto::AreaId::new("southvale").unwrap(),
        items: 7,
        oldest_queued_ms: Some(1_795_000_000_123),
    }];
    let text = m.render(&depths, true, DiskReading::default(), &[]);
    assert!(
        text.contains("\ngateway_messages_submitted_total 3\n"),
        "{text}"
    );
    assert!(
        text.contains("gateway_peer_queue_depth{peer=\"southvale\"} 7"),
        "{text}"
    );
    assert!(
        text.contains(
            "\ngateway_peer_oldest_queued_timestamp_seconds{peer=\"southvale\"} 1795000000.123\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("# TYPE gateway_store_ok gauge\ngateway_store_ok 1\n"),
        "{text}"
    );
    assert!(m
        .render(&[], false, DiskReading::default(), &[])
        .contains("\ngateway_store_ok 0\n"));
    let waiting = |m: &Metrics| {
        m.render(&[], true, DiskReading::default(), &[])
            .contains(&format!(
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

#[test]
fn the_text_shows_the_disk_reading() {
    let m = Metrics::default();
    m.refused_disk_low.add(2);
    let reading = DiskReading {
        free_bytes: Some(1000),
        reserve_bytes: 4096,
        low: true,
    };
    let text = m.render(&[], true, reading, &[]);
    for line in [
        "\ngateway_disk_low 1\n",
        "\ngateway_disk_free_bytes 1000\n",
        "\ngateway_disk_reserve_bytes 4096\n",
        "\ngateway_refused_disk_low_total 2\n",
    ] {
        assert!(text.contains(line), "{line:?} in {text}");
    }
    let unread = m.render(&[], true, DiskReading::default(), &[]);
    assert!(unread.contains("\ngateway_disk_low 0\n"), "{unread}");
    assert!(
        !unread.contains("gateway_disk_free_bytes"),
        "no figure before the first reading: {unread}"
    );
}

#[test]
fn the_text_shows_when_each_certificate_expires() {
    let m = Metrics::default();
    let certs = [
        CertificateReading {
            certificate: "gateway",
            peer: None,
            not_after: 1_900_000_000,
        },
        CertificateReading {
            certificate: "peer_ca",
            peer: Some(proto::AreaId::new("southvale").unwrap()),
            not_after: 2_000_000_000,
        },
    ];
    let text = m.render(&[], true, DiskReading::default(), &certs);
    for line in [
        "# TYPE gateway_certificate_not_after_seconds gauge\n",
        "\ngateway_certificate_not_after_seconds{certificate=\"gateway\"} 1900000000\n",
        "\ngateway_certificate_not_after_seconds{certificate=\"peer_ca\",peer=\"southvale\"} 2000000000\n",
    ] {
        assert!(text.contains(line), "{line:?} in {text}");
    }
}

#[test]
fn the_text_shows_each_revocation_list_and_a_failed_reload() {
    let lists = [certs::CrlInfo {
        area: proto::AreaId::new("northshire").unwrap(),
        path: "/etc/gw/north \"a\".crl".into(),
        this_update: 1_800_000_000,
        next_update: Some(1_800_604_800),
        revoked: 2,
    }];
    let text = revocation_text(&lists, true);
    for line in [
        "# TYPE gateway_crl_next_update_seconds gauge\n",
        "\ngateway_crl_next_update_seconds{area=\"northshire\",file=\"/etc/gw/north \\\"a\\\".crl\"} 1800604800\n",
        "\ngateway_crl_revoked_certificates{area=\"northshire\",file=\"/etc/gw/north \\\"a\\\".crl\"} 2\n",
        "\ngateway_crl_reload_failed 1\n",
    ] {
        assert!(text.contains(line), "{line:?} in {text}");
    }
    assert!(revocation_text(&[], false).contains("\ngateway_crl_reload_failed 0\n"));
}
