//! The checker's self-test: a small clean history passes, and each planted fault is flagged
//! as exactly its own kind. A checker that cannot fail is worthless.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use client_proto::{ConversationId, DeviceId, ErrorCode, GroupId, MessageId, UserId};

use super::{check, Kind};
use crate::chaos::history::*;

fn uid(u: usize) -> UserId {
    UserId(100 + u as u64)
}

fn conv(h: &History, to: Target, from: usize) -> ConversationId {
    match to {
        Target::User(u) => ConversationId::direct(uid(from), uid(u)),
        Target::Group(g) => ConversationId::Group(h.groups[g].id),
    }
}

/// Adds send `seq` of `user` from `device`, lasting `(start, end)`.
fn send(
    h: &mut History,
    (user, device, seq): (usize, usize, u64),
    to: Target,
    (start, end): (Ms, Ms),
    outcome: Outcome,
) {
    let conversation = conv(h, to, user);
    h.sends.push(Send {
        user,
        device,
        seq,
        body: format!("chaos:1:{user}:{seq}"),
        to,
        conversation,
        start_ms: start,
        end_ms: end,
        outcome,
    });
}

fn acked(h: &History, id: u64, to: Target, from: usize) -> Outcome {
    Outcome::Acked {
        message_id: MessageId(id),
        conversation: conv(h, to, from),
        ts: id,
    }
}

/// Delivers send `i` as message `id` to `device` at `at`.
fn deliver(h: &mut History, i: usize, id: u64, device: usize, at: Ms) {
    let s = &h.sends[i];
    h.deliveries.push(Delivery {
        device,
        at_ms: at,
        message_id: MessageId(id),
        conversation: s.conversation,
        from: uid(s.user),
        body: s.body.clone(),
    });
}

/// Three users with two devices each, one group of all three, two nodes; four acked sends,
/// one indeterminate send that was stored anyway, one refused send; every device got what it
/// should, and both nodes answer the same.
fn clean() -> History {
    let mut h = History {
        seed: 1,
        fault: "pause".into(),
        nodes: 2,
        ..History::default()
    };
    for u in 0..3 {
        h.users.push(User {
            id: uid(u),
            name: format!("u{u}"),
            devices: vec![2 * u, 2 * u + 1],
        });
        for k in 0..2 {
            h.devices.push(Device {
                user: u,
                device_id: DeviceId((10 * u + k) as u64),
                first_node: (2 * u + k) % 2,
            });
        }
    }
    h.groups.push(Group {
        id: GroupId(7),
        members: vec![0, 1, 2],
    });
    let plan = [
        (0, 0, 0, Target::User(1), 100, 110, Some(1000)),
        (0, 1, 1, Target::Group(0), 120, 130, Some(1010)),
        (1, 2, 0, Target::User(2), 105, 115, Some(1005)),
        (2, 5, 0, Target::Group(0), 140, 150, Some(1020)),
    ];
    for (user, device, seq, to, start, end, id) in plan {
        let outcome = acked(&h, id.unwrap(), to, user);
        send(&mut h, (user, device, seq), to, (start, end), outcome);
    }
    // Timed out, yet stored as 1030: it may appear.
    let outcome = Outcome::Indeterminate {
        reason: "timeout".into(),
    };
    send(&mut h, (1, 3, 1), Target::User(0), (200, 60_200), outcome);
    // Refused for good: it must never appear.
    let outcome = Outcome::Refused {
        code: ErrorCode::Forbidden,
        message: "not a member".into(),
    };
    send(&mut h, (2, 4, 1), Target::User(0), (160, 161), outcome);

    for i in 0..4 {
        let s = h.sends[i].clone();
        let id = s.outcome.message_id().unwrap().0;
        for d in h.expected_devices(&s) {
            deliver(&mut h, i, id, d, s.end_ms + 5);
        }
    }
    deliver(&mut h, 4, 1030, 0, 300);
    for d in 0..6 {
        h.links.push(LinkEvent {
            device: d,
            at_ms: 0,
            change: LinkChange::Connected { node: d % 2 },
        });
    }
    h.faults.push(Fault {
        kind: "pause".into(),
        nodes: vec![1],
        applied_ms: 50,
        healed_ms: Some(112),
    });
    h.workload_end_ms = 1000;
    h.end_ms = 2000;
    // Final reads: what each inbox and conversation holds, the same through both nodes.
    let stored: Vec<(usize, u64)> = vec![(0, 1000), (1, 1010), (2, 1005), (3, 1020), (4, 1030)];
    for node in 0..2 {
        for u in 0..3 {
            let mut ids: Vec<MessageId> = stored
                .iter()
                .filter(|(i, _)| h.participants(&h.sends[*i]).contains(&u))
                .map(|(_, id)| MessageId(*id))
                .collect();
            ids.sort();
            h.inbox_reads.push(InboxRead {
                user: u,
                node,
                ids: Ok(ids),
            });
        }
        let convs: BTreeSet<String> = h.sends.iter().map(|s| s.conversation.to_string()).collect();
        for c in convs {
            let conversation: ConversationId = c.parse().unwrap();
            let mut ids: Vec<MessageId> = stored
                .iter()
                .filter(|(i, _)| h.sends[*i].conversation == conversation)
                .map(|(_, id)| MessageId(*id))
                .collect();
            ids.sort();
            ids.reverse();
            h.history_reads.push(HistoryRead {
                conversation,
                node,
                ids: Ok(ids),
            });
        }
    }
    h
}

/// Asserts that the checker flags `h` with exactly `kind`.
fn flags_only(h: &History, kind: Kind) {
    let v = check(h);
    assert_eq!(
        v.kinds(),
        BTreeSet::from([kind]),
        "expected only {kind}: {:#?}",
        v.findings
    );
}

#[test]
fn a_clean_history_passes() {
    let h = clean();
    let v = check(&h);
    assert!(v.is_clean(), "{:#?}", v.findings);
    assert_eq!((v.acked, v.refused, v.indeterminate), (4, 1, 1));
}

#[test]
fn a_dropped_delivery_is_lost() {
    let mut h = clean();
    let gone = h.deliveries.remove(3);
    let v = check(&h);
    flags_only(&h, Kind::Lost);
    assert_eq!(v.count(Kind::Lost), 1);
    assert_eq!(v.lost_messages(), 1);
    assert_eq!(v.findings[0].device, Some(gone.device));
    assert_eq!(v.findings[0].message, Some(gone.message_id));
    assert_eq!(v.lost_on_steady_devices, 1);
}

#[test]
fn a_message_delivered_twice_is_duplicated() {
    let mut h = clean();
    let again = h.deliveries[2].clone();
    h.deliveries.push(again);
    flags_only(&h, Kind::Duplicated);
}

#[test]
fn an_invented_message_is_unexpected() {
    let mut h = clean();
    let mut fake = h.deliveries[0].clone();
    fake.message_id = MessageId(9999);
    fake.body = "chaos:1:0:99".into();
    h.deliveries.push(fake);
    flags_only(&h, Kind::Unexpected);
}

#[test]
fn a_message_at_a_non_recipient_is_unexpected() {
    let mut h = clean();
    // Send 0 is user 0 to user 1; device 4 belongs to user 2.
    deliver(&mut h, 0, 1000, 4, 200);
    flags_only(&h, Kind::Unexpected);
}

#[test]
fn a_wrong_sender_or_conversation_is_unexpected() {
    let mut h = clean();
    h.deliveries[0].from = uid(2);
    flags_only(&h, Kind::Unexpected);
    let mut h = clean();
    h.deliveries[0].conversation = ConversationId::Group(GroupId(7));
    flags_only(&h, Kind::Unexpected);
}

#[test]
fn a_body_stored_under_two_ids_is_unexpected() {
    let mut h = clean();
    // The indeterminate send shows up as a second message too.
    deliver(&mut h, 4, 1031, 1, 400);
    flags_only(&h, Kind::Unexpected);
}

#[test]
fn a_refused_message_that_appears_is_unexpected() {
    let mut h = clean();
    h.sends[0].outcome = Outcome::Refused {
        code: ErrorCode::Forbidden,
        message: "no".into(),
    };
    flags_only(&h, Kind::Unexpected);
    // Refused with `unavailable`, it may have been stored: fine.
    h.sends[0].outcome = Outcome::Refused {
        code: ErrorCode::Unavailable,
        message: "no quorum".into(),
    };
    assert!(check(&h).is_clean());
}

#[test]
fn swapped_ids_of_one_sender_are_out_of_order() {
    let mut h = clean();
    let swap = |id: MessageId| match id.0 {
        1000 => MessageId(1010),
        1010 => MessageId(1000),
        _ => id,
    };
    for s in &mut h.sends {
        if let Outcome::Acked { message_id, .. } = &mut s.outcome {
            *message_id = swap(*message_id);
        }
    }
    for d in &mut h.deliveries {
        d.message_id = swap(d.message_id);
    }
    for r in &mut h.inbox_reads {
        if let Ok(ids) = &mut r.ids {
            ids.iter_mut().for_each(|id| *id = swap(*id));
        }
    }
    for r in &mut h.history_reads {
        if let Ok(ids) = &mut r.ids {
            ids.iter_mut().for_each(|id| *id = swap(*id));
        }
    }
    flags_only(&h, Kind::OutOfOrder);
}

#[test]
fn a_history_out_of_order_is_flagged() {
    let mut h = clean();
    let r = h
        .history_reads
        .iter_mut()
        .find(|r| r.ids.as_ref().is_ok_and(|ids| ids.len() >= 2))
        .unwrap();
    if let Ok(ids) = &mut r.ids {
        ids.swap(0, 1);
    }
    flags_only(&h, Kind::OutOfOrder);
}

#[test]
fn a_node_whose_sync_differs_is_divergent() {
    let mut h = clean();
    let r = h
        .inbox_reads
        .iter_mut()
        .find(|r| r.node == 1 && r.user == 1)
        .unwrap();
    if let Ok(ids) = &mut r.ids {
        ids.pop();
    }
    flags_only(&h, Kind::Divergent);
    // An extra id through one node only differs too.
    let mut h = clean();
    if let Ok(ids) = &mut h.inbox_reads[0].ids {
        ids.push(MessageId(5000));
    }
    flags_only(&h, Kind::Divergent);
}

#[test]
fn a_failed_or_differing_history_read_is_divergent() {
    let mut h = clean();
    h.history_reads[0].ids = Err("unavailable".into());
    flags_only(&h, Kind::Divergent);
    let mut h = clean();
    let last = h.history_reads.len() - 1;
    if let Ok(ids) = &mut h.history_reads[last].ids {
        ids.remove(0);
    }
    flags_only(&h, Kind::Divergent);
}

#[test]
fn heal_latency_counts_messages_late_at_the_heal() {
    let h = clean();
    let v = check(&h);
    // Acked before the heal at 112: send 0 (at 110, delivered at 115) and send 2 (at 115:
    // after the heal, not counted).
    assert_eq!(v.heal["pause"].latencies_ms, vec![3]);
    assert_eq!(v.heal["pause"].never, 0);
    let mut h = clean();
    h.deliveries.remove(0);
    let v = check(&h);
    assert_eq!(v.heal["pause"].latencies_ms, Vec::<Ms>::new());
    assert_eq!(v.heal["pause"].never, 1);
}

#[test]
fn a_history_survives_json() {
    let h = clean();
    let back = History::from_json(&h.to_json().unwrap()).unwrap();
    assert_eq!(back, h);
    let mut broken = clean();
    broken.deliveries.remove(0);
    let back = History::from_json(&broken.to_json().unwrap()).unwrap();
    assert_eq!(check(&back), check(&broken));
}
