//! The last bytes of the worker's stderr, for PROCESS_ERROR heartbeats.

use std::collections::VecDeque;

/// A ring of the last `cap` bytes written.
#[derive(Debug, Clone)]
pub struct StderrTail {
    buf: VecDeque<u8>,
    cap: usize,
}

impl StderrTail {
    pub fn new(cap: usize) -> Self {
        StderrTail {
            buf: VecDeque::with_capacity(cap.min(64 * 1024)),
            cap,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.cap == 0 {
            return;
        }
        let keep = &bytes[bytes.len().saturating_sub(self.cap)..];
        let overflow = (self.buf.len() + keep.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.buf.extend(keep);
    }

    /// The tail as text: invalid UTF-8 is replaced, and a character cut in half at
    /// the start of the ring is dropped rather than shown as garbage.
    pub fn text(&self) -> String {
        let bytes: Vec<u8> = self.buf.iter().copied().collect();
        let start = bytes
            .iter()
            .take(3)
            .take_while(|b| (**b & 0b1100_0000) == 0b1000_0000)
            .count();
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_last_bytes() {
        let mut t = StderrTail::new(8);
        assert!(t.is_empty());
        t.push(b"hello ");
        t.push(b"world\n");
        assert_eq!(t.text(), "o world\n");
        t.push(b"0123456789abcdef");
        assert_eq!(t.text(), "89abcdef");
        let mut z = StderrTail::new(0);
        z.push(b"x");
        assert_eq!(z.text(), "");
    }

    #[test]
    fn a_character_cut_at_the_start_is_dropped() {
        let mut t = StderrTail::new(5);
        t.push("aé€b".as_bytes()); // a(1) é(2) €(3) b(1) = 7 bytes; keep the last 5
        assert_eq!(t.text(), "€b");
        let mut t = StderrTail::new(4);
        t.push(&[b'x', 0xff, b'y', b'z']);
        assert_eq!(t.text(), "x\u{fffd}yz");
    }
}
