//! A gateway short of disk space: new messages wait at their senders,
//! everything else goes on, and it takes messages again on its own once
//! there is room. The disk is the real one: a filler file takes the free
//! space below the gateway's reserve.

use std::time::Duration;

use proto::{ErrorCode, Status};
use tests::{eventually, message, reaches, Federation, Settings};

const MIB: u64 = 1024 * 1024;

/// Free bytes on the file system holding `dir`, as the gateway reads them.
fn free_bytes(dir: &std::path::Path) -> u64 {
    let s = rustix::fs::statvfs(dir).unwrap();
    s.f_bavail * s.f_frsize
}

async fn health_status(api: &client::Api) -> String {
    api.health()
        .await
        .ok()
        .and_then(|h| h.get("status")?.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_short_of_disk_refuses_new_messages_serves_the_rest_and_recovers_on_its_own() {
    let mut fed = Federation::create(&tests::standard_areas(), &Settings::default()).unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let data_b = fed.areas[b].dir.join("data");
    std::fs::create_dir_all(&data_b).unwrap();
    // southvale keeps a reserve 256 MiB below what is free now; a 512 MiB
    // filler then takes the free space 256 MiB below the reserve. The
    // margins are for whatever else writes to this disk meanwhile.
    let free = free_bytes(&data_b);
    assert!(
        free > 1024 * MIB,
        "this test needs 1 GiB free on the temporary directory's disk"
    );
    let reserve_mib = free / MIB - 256;
    let path = &fed.areas[b].config_path;
    let config = std::fs::read_to_string(path).unwrap();
    assert!(config.contains("[limits]\n"));
    let config = config.replacen(
        "[limits]\n",
        &format!("[limits]\nmin_free_disk_mib = {reserve_mib}\n"),
        1,
    );
    std::fs::write(path, config).unwrap();
    fed.start_all().await.unwrap();
    let alice = fed.api(a, "alice").unwrap();
    let dan = fed.api(b, "dan").unwrap();
    let gita = fed.api(b, "gita").unwrap();
    let inbox_rows = || fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap();

    let first = alice
        .submit(&message("user:dan@southvale", "k-1", b"first".to_vec()).unwrap())
        .await
        .unwrap();
    assert!(
        reaches(
            &alice,
            &first.message_id,
            Status::Delivered,
            Duration::from_secs(20)
        )
        .await
    );
    assert_eq!(health_status(&dan).await, "ok");
    let note = || message("user:dan@southvale", "k-0", b"note".to_vec()).unwrap();
    let earlier = gita.submit(&note()).await.unwrap();

    // The filler takes the free space below the reserve.
    let filler = data_b.join("filler");
    let file = std::fs::File::create(&filler).unwrap();
    rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, 512 * MIB).unwrap();
    file.sync_all().unwrap();
    drop(file);
    assert!(
        eventually(Duration::from_secs(20), || async {
            health_status(&dan).await == "degraded"
        })
        .await,
        "southvale must say it is short of disk space"
    );
    let metrics = fed
        .gateway(b)
        .unwrap()
        .metrics()
        .render(&[], true, Default::default(), &[]);
    assert!(
        metrics.contains("gateway_refused_disk_low_total 0"),
        "{metrics}"
    );

    // A local submission is refused, typed, with nothing stored.
    let refused = gita
        .submit(&message("user:dan@southvale", "k-2", b"local".to_vec()).unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(ErrorCode::InsufficientStorage),
        "{refused}"
    );
    assert!(
        matches!(
            refused,
            client::ClientError::Api {
                status: 507,
                retry_after: Some(_),
                ..
            }
        ),
        "{refused:?}"
    );
    assert_eq!(inbox_rows(), 2);
    // A repeat of a stored submission (a retry after a lost answer) is
    // still answered as one.
    let repeat = gita.submit(&note()).await.unwrap();
    assert!(repeat.duplicate);
    assert_eq!(repeat.message_id, earlier.message_id);

    // The duty worker still reads and acknowledges what is there, and the
    // sender still hears of it.
    assert_eq!(dan.fetch(&first.message_id).await.unwrap().body.0, b"first");
    assert_eq!(
        dan.ack(&first.message_id).await.unwrap(),
        Status::Acknowledged
    );
    assert!(
        reaches(
            &alice,
            &first.message_id,
            Status::Acknowledged,
            Duration::from_secs(20)
        )
        .await
    );

    // A message from another area is accepted there and waits in its queue.
    let second_at = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let second = alice
        .submit(&message("user:dan@southvale", "k-3", b"second".to_vec()).unwrap())
        .await
        .unwrap();
    let gw_a = fed.gateway(a).unwrap().metrics();
    let gw_b = fed.gateway(b).unwrap().metrics();
    assert!(
        eventually(Duration::from_secs(20), || async {
            gw_b.refused_disk_low.get() >= 3 && gw_a.federation_failures.get() >= 2
        })
        .await,
        "northshire keeps offering it and southvale keeps refusing it"
    );
    assert_eq!(inbox_rows(), 2);
    // alice is told why it waits.
    let st = alice.status(&second.message_id).await.unwrap();
    assert_eq!(st.status, Status::Accepted);
    let waiting = st
        .waiting
        .expect("the sender sees that southvale is failing");
    assert_eq!(
        waiting.last_error,
        "peer answered HTTP 507 (insufficient_storage)"
    );
    assert!(waiting.since_ms >= second_at - 1000, "{waiting:?}");
    // A message sent now is accepted with the same news.
    let third = alice
        .submit(&message("user:dan@southvale", "k-4", b"third".to_vec()).unwrap())
        .await
        .unwrap();
    assert_eq!(third.waiting, Some(waiting));

    // Room again: no restart, nothing to do but wait for the next reading.
    std::fs::remove_file(&filler).unwrap();
    assert!(
        reaches(
            &alice,
            &second.message_id,
            Status::Delivered,
            Duration::from_secs(30)
        )
        .await,
        "the queued message goes through once there is room"
    );
    assert!(
        reaches(
            &alice,
            &third.message_id,
            Status::Delivered,
            Duration::from_secs(30)
        )
        .await
    );
    assert_eq!(health_status(&dan).await, "ok");
    assert_eq!(
        alice.status(&second.message_id).await.unwrap().waiting,
        None,
        "nothing is said once it is delivered"
    );
    let again = gita
        .submit(&message("user:dan@southvale", "k-2", b"local".to_vec()).unwrap())
        .await
        .unwrap();
    assert!(!again.duplicate, "the refused submission stored nothing");
    let listed = dan.inbox(Duration::ZERO).await.unwrap();
    let ids: Vec<_> = listed
        .messages
        .iter()
        .map(|m| m.envelope.message_id.clone())
        .collect();
    assert_eq!(
        ids,
        vec![
            earlier.message_id.clone(),
            second.message_id.clone(),
            third.message_id.clone(),
            again.message_id.clone()
        ],
        "each once"
    );
}
