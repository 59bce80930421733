//! Finding a marker string in a body that arrives in pieces (shared by the fault-drill plugins):
//! keeps the last `marker.len() - 1` bytes of the previous chunk so a marker split across two
//! chunks is still found.

/// Per-stream marker search state.
#[derive(Debug, Default)]
pub struct MarkerScan {
    tail: Vec<u8>,
}

impl MarkerScan {
    /// Whether `marker` ends within `bytes` (or straddles the previous chunk and `bytes`).
    pub fn feed(&mut self, marker: &[u8], bytes: &[u8]) -> bool {
        if marker.is_empty() {
            return false;
        }
        let mut window = std::mem::take(&mut self.tail);
        window.extend_from_slice(bytes);
        let found = window.windows(marker.len()).any(|w| w == marker);
        let keep = (marker.len() - 1).min(window.len());
        self.tail = window.split_off(window.len() - keep);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_split_across_chunks_is_found() {
        let mut s = MarkerScan::default();
        assert!(!s.feed(b"BOOM", b"xxBO"));
        assert!(s.feed(b"BOOM", b"OMyy"));
        let mut s = MarkerScan::default();
        assert!(!s.feed(b"BOOM", b"B"));
        assert!(!s.feed(b"BOOM", b"O"));
        assert!(s.feed(b"BOOM", b"OM"));
    }
}
