//! Arbitrary bytes through the frame reader and the decoder of both directions: every input must
//! end in a message, a clean end or an error, never a panic, a stack overflow or a huge allocation.
#![no_main]

use ipc_protocol::{FrameReader, FromPlugin, ToPlugin};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("current-thread runtime");
    rt.block_on(async {
        let mut reader = FrameReader::with_max_frame(data, 1 << 20);
        while let Ok(Some(_)) = reader.read::<ToPlugin>().await {}
        let mut reader = FrameReader::with_max_frame(data, 1 << 20);
        while let Ok(Some(_)) = reader.read::<FromPlugin>().await {}
        // Also the payload alone, as if it had arrived framed.
        let _ = ipc_protocol::codec::decode::<ToPlugin>(data);
        let _ = ipc_protocol::codec::decode::<FromPlugin>(data);
    });
});
