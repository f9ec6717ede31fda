//! Decoding worker messages from arbitrary bytes, as the coordinator does off the wire, then the
//! conversions it applies to what decodes: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use recur_core::metrics::BatchSums;
use recur_core::model::ModelConfig;
use recur_proto::v1 as pb;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = pb::WorkerMessage::decode(data) {
        match msg.kind {
            Some(pb::worker_message::Kind::StepResult(r)) => {
                let _ = r.sums.as_ref().map(BatchSums::from);
                let _ = r.grad_sum.iter().all(|v| v.is_finite());
            }
            Some(pb::worker_message::Kind::EvalResult(r)) => {
                for b in &r.batches {
                    let _ = b.sums.as_ref().map(BatchSums::from);
                }
            }
            _ => {}
        }
    }
    if let Ok(msg) = pb::CoordinatorMessage::decode(data)
        && let Some(pb::coordinator_message::Kind::LoadShard(s)) = msg.kind
        && let Some(m) = s.model.as_ref()
    {
        let _ = ModelConfig::try_from(m).map(|c| c.layout().total());
    }
});
