//! The reassembler of pieced gossip messages (src/gossip/pieces.rs) on arbitrary authentic
//! pieces: what a holder of the cluster secret can make a receiver hold.
//!
//! The input drives a reassembler with small bounds (so they are reached): each step moves the
//! clock forward 0-255 ms and delivers, from one of 16 source addresses, either arbitrary bytes
//! as a piece (often behind a plausible header: one of 4 message ids, small index and count),
//! or a piece of an honest message from a 17th source (input-chosen index, so pieces come out
//! of order and twice).
//!
//! Checked: no panic; the held messages and bytes stay within the bounds after every step;
//! nothing completes larger than the largest chitchat datagram; whatever completes from the
//! honest source is the honest message.
#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use meshsec::gossip::pieces::{split, ReassemblyConfig, Reassembler, MAX_MESSAGE};

const CFG: ReassemblyConfig = ReassemblyConfig {
    timeout: Duration::from_millis(2_000),
    max_per_source: 2,
    max_messages: 6,
    max_bytes: MAX_MESSAGE,
};

fn src(i: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], 9000 + u16::from(i)))
}

fuzz_target!(|data: &[u8]| {
    let honest: Vec<u8> = (0..5_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let honest_pieces: Vec<Vec<u8>> = split(77, &honest).collect();
    let mut r = Reassembler::new(CFG);
    let mut now = 0u64;
    let mut rest = data;
    while rest.len() >= 3 {
        let (step, tail) = rest.split_at(3);
        rest = tail;
        now += u64::from(step[0]);
        let (from, piece) = if step[1] & 0x80 != 0 {
            let i = usize::from(step[2]) % honest_pieces.len();
            (src(16), honest_pieces[i].clone())
        } else {
            let len = usize::from(step[2]).min(rest.len());
            let (body, tail) = rest.split_at(len);
            rest = tail;
            let mut piece = body.to_vec();
            if step[1] & 0x40 != 0 && piece.len() >= 12 {
                piece[..8].copy_from_slice(&u64::from(step[1] & 3).to_be_bytes());
                let (index, count) = (u16::from(piece[8] % 4), u16::from(piece[10] % 4));
                piece[8..10].copy_from_slice(&index.to_be_bytes());
                piece[10..12].copy_from_slice(&count.to_be_bytes());
            }
            (src(step[1] & 0x0f), piece)
        };
        if let Ok(Some(message)) = r.accept(now, from, &piece) {
            assert!(message.len() <= MAX_MESSAGE);
            if from == src(16) {
                assert_eq!(message, honest, "the honest message came out different");
            }
        }
        assert!(r.messages() <= CFG.max_messages, "{} messages held", r.messages());
        assert!(r.bytes() <= CFG.max_bytes, "{} bytes held", r.bytes());
    }
    r.expire(now + 2_000);
    assert_eq!((r.messages(), r.bytes()), (0, 0));
});
