//! `hello-plugin`: an example plugvisor plugin built on the `plugin-runner` SDK.
//!
//! For every request it reports a configurable greeting, the request's `x-request-id`, the
//! response status, and how many body chunks and bytes went by, under `plugvisor.hello`. It needs
//! no body bytes (only their lengths), so it subscribes without them. Run it as
//! `hello-plugin --connect /run/plugvisor/plugins/hello.sock`, or let the supervisor spawn it
//! with `command = "/usr/local/bin/hello-plugin"`.
#![forbid(unsafe_code)]

use plugin_runner::{
    Chunk, ConfigError, ConfigMap, EventCtx, Final, Metadata, Plugin, RequestStart,
    ResponseHeaders, Subscriptions, Value,
};

/// The plugin: one greeting for all streams. `Clone`, because the SDK configures a clone per
/// connection to the front (a reload that changes the greeting gets a new one).
#[derive(Clone)]
struct Hello {
    greeting: String,
}

/// What the plugin remembers about one request.
#[derive(Default)]
struct Stream {
    request_id: Option<String>,
    status: u16,
    chunks: u64,
    bytes: u64,
}

impl Plugin for Hello {
    type Stream = Stream;

    fn name(&self) -> &str {
        "hello"
    }

    fn subscriptions(&self) -> Subscriptions {
        Subscriptions {
            body_bytes: false,
            ..Subscriptions::ALL
        }
    }

    fn configure(&mut self, config: &Value) -> Result<(), ConfigError> {
        let config = ConfigMap::new(config)?;
        config.deny_unknown(&["greeting"])?;
        if let Some(greeting) = config.str("greeting")? {
            self.greeting = greeting.to_owned();
        }
        Ok(())
    }

    fn on_request_start(&self, s: &mut Stream, _: &EventCtx, e: &RequestStart) {
        s.request_id = e.request_id.clone();
    }

    fn on_response_headers(&self, s: &mut Stream, _: &EventCtx, e: &ResponseHeaders) {
        s.status = e.status;
    }

    fn on_chunk(&self, s: &mut Stream, _: &EventCtx, c: &Chunk) {
        s.chunks += 1;
        s.bytes += u64::from(c.len);
    }

    fn on_final(&self, s: &mut Stream, _: &EventCtx, f: &Final) -> Metadata {
        let map = Value::map([
            ("greeting", Value::from(self.greeting.as_str())),
            ("request_id", Value::from(s.request_id.clone())),
            ("status", Value::from(u32::from(s.status))),
            ("chunks", Value::from(s.chunks)),
            ("bytes", Value::from(s.bytes + u64::from(f.len))),
        ]);
        Metadata::from([("plugvisor.hello".to_owned(), map)])
    }
}

fn main() {
    plugin_runner::run(Hello {
        greeting: "hello".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_runner::testing::{Player, Split, Stream};

    fn hello() -> Hello {
        Hello {
            greeting: "hello".into(),
        }
    }

    #[test]
    fn counts_chunks_and_bytes_and_greets() {
        let config = Value::map([("greeting", Value::from("bonjour"))]);
        let player = Player::configured(hello(), &config).unwrap();
        let stream = Stream::new(1)
            .request(&[("x-request-id", "req-1")])
            .response(200, &[("content-type", "text/event-stream")])
            .body("data: 0123456789\n\n", Split::Every(10))
            .final_(b"12345");
        let played = player.play(&stream);
        let own = played.own();
        assert_eq!(own.get("greeting"), Some(&Value::from("bonjour")));
        assert_eq!(own.get("request_id"), Some(&Value::from("req-1")));
        assert_eq!(own.get("status"), Some(&Value::Int(200)));
        assert_eq!(own.get("chunks"), Some(&Value::Int(2)));
        assert_eq!(own.get("bytes"), Some(&Value::Int(18 + 5)));
    }

    #[test]
    fn a_chunk_the_front_dropped_is_reported_as_a_gap() {
        let player = Player::new(hello());
        let stream = Stream::new(1)
            .request(&[])
            .response(200, &[])
            .chunks(["abc", "def", "ghi"])
            .final_(b"")
            .drop_seqs([3]);
        let played = player.play(&stream);
        assert_eq!(played.own().get("chunks"), Some(&Value::Int(2)));
        assert_eq!(played.own().get("gaps"), Some(&Value::Int(1)));
    }

    #[test]
    fn unknown_config_keys_are_refused() {
        let err = Player::configured(hello(), &Value::map([("greting", Value::from("typo"))]))
            .err()
            .unwrap();
        assert!(err.to_string().contains("unknown key `greting`"));
    }
}
