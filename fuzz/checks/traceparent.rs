// `observe::trace::parse` (W3C `traceparent`): arbitrary bytes never panic;
// whatever is accepted has non-zero ids, and the header berth sends for it
// parses back to the same trace.
//
// `include!`d by fuzz/fuzz_targets/traceparent.rs and crates/api/tests/fuzz_seeds.rs,
// so no inner attributes here.

use observe::trace::{parse, TraceContext};

pub fn check(data: &[u8]) {
    let ctx = TraceContext::for_request(Some(data));
    match parse(data) {
        Some(p) => {
            assert_ne!(p.trace_id, [0; 16]);
            assert_ne!(p.parent_id, [0; 8]);
            assert_eq!(ctx.trace_id, p.trace_id, "the request joins the caller's trace");
            assert_eq!(ctx.parent_id, Some(p.parent_id));
        }
        None => assert_eq!(ctx.parent_id, None, "an invalid header starts a new trace"),
    }
    let sent = ctx.header();
    assert_eq!(sent.len(), 55);
    assert_eq!(parse(sent.as_bytes()).map(|p| p.trace_id), Some(ctx.trace_id));
}
