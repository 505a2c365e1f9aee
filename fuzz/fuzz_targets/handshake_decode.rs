//! The datagram decoder and payload decoders on arbitrary bytes: no panic, and whatever decodes
//! re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshsec::handshake::wire::{self, InitPayload, Message, RespPayload};

fuzz_target!(|data: &[u8]| {
    match wire::decode(data) {
        Ok(Message::Initiation(m)) => {
            let re = wire::encode_initiation(m.sender_index, m.noise);
            assert_eq!(
                &re[..wire::INITIATION_MAC1_OFF],
                &data[..wire::INITIATION_MAC1_OFF]
            );
            assert_eq!(data.len(), wire::INITIATION_LEN);
        }
        Ok(Message::Response(m)) => {
            let re = wire::encode_response(m.sender_index, m.receiver_index, m.noise);
            assert_eq!(
                &re[..wire::RESPONSE_MAC1_OFF],
                &data[..wire::RESPONSE_MAC1_OFF]
            );
        }
        Ok(Message::CookieReply(m)) => {
            let re = wire::encode_cookie_reply(m.receiver_index, m.nonce, m.sealed);
            assert_eq!(&re[..], data);
        }
        Err(_) => {}
    }
    if let Ok(p) = InitPayload::decode(data) {
        assert_eq!(&p.encode()[..], data);
    }
    if let Ok(p) = RespPayload::decode(data) {
        assert_eq!(&p.encode()[..], data);
    }
});
