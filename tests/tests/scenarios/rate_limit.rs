//! The rate limit: a burst past it is refused with `rate_limited`, and only acked sends are
//! stored.

use chat_tests::{to, TestNode, Transport};
use client_proto::{ClientFrame, ErrorCode, MessageId};

/// (Over QUIC this also holds the rate-limit part of the former
/// `limits_and_bad_input_hold_over_quic`, whose `limited >= 10` follows from
/// `acked + limited == 40` with at most 22 acked.)
async fn a_burst_past_the_rate_limit_is_refused_and_not_stored(t: Transport) {
    let node = TestNode::start(&["--rate-limit-per-sec", "1", "--rate-limit-burst", "20"]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = t.connect(&node, &alice.login).await;
    for i in 0..40 {
        a.send(&ClientFrame::Send {
            id: format!("b{i}"),
            to: to(bob.id),
            body: "burst".into(),
        })
        .await
        .unwrap();
    }
    let mut acked = Vec::new();
    let mut limited = 0;
    for i in 0..40 {
        match a.wait_ack(&format!("b{i}")).await {
            Ok(ack) => acked.push(ack.message_id),
            Err(e) if e.code() == Some(ErrorCode::RateLimited) => limited += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!((20..=22).contains(&acked.len()), "{} acked", acked.len());
    assert_eq!(acked.len() + limited, 40);
    let (_, mut b) = t.device(&node, &bob).await;
    let stored: Vec<MessageId> = b
        .sync_all(None, None)
        .await
        .unwrap()
        .ids()
        .into_iter()
        .collect();
    acked.sort();
    assert_eq!(stored, acked, "only acked sends are stored");
}
over_each_transport!(a_burst_past_the_rate_limit_is_refused_and_not_stored =>
    a_burst_past_the_rate_limit_is_refused_and_not_stored_over_ws_json,
    a_burst_past_the_rate_limit_is_refused_and_not_stored_over_ws_binary,
    a_burst_past_the_rate_limit_is_refused_and_not_stored_over_quic,
);
