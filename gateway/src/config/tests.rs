use std::path::Path;

use super::*;

const MINIMAL: &str = "area = \"northshire\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[tls]\ncert = \"gateway.crt\"\nkey = \"gateway.key\"\nca = \"ca.crt\"\n";

fn parse(extra: &str) -> Result<Config, ConfigError> {
    Config::parse(
        &format!("{MINIMAL}\n{extra}"),
        Path::new("gateway.toml"),
        Path::new("."),
    )
}

#[test]
fn values_out_of_bounds_are_refused_naming_their_key() {
    parse("").unwrap();
    parse("[delivery]\nbatch_max_items = 4096\nmessage_validity = \"30d\"\n").unwrap();
    for (toml, key) in [
        (
            "[delivery]\nbatch_max_items = 0\n",
            "delivery.batch_max_items",
        ),
        (
            "[delivery]\nbatch_max_items = 4097\n",
            "delivery.batch_max_items",
        ),
        (
            "[delivery]\nmessage_validity = \"0s\"\n",
            "delivery.message_validity",
        ),
        (
            "[delivery]\nmessage_validity = \"300000000000y\"\n",
            "delivery.message_validity",
        ),
        (
            "[delivery]\npeer_timeout = \"0s\"\n",
            "delivery.peer_timeout",
        ),
        ("[delivery]\nretry_max = \"2d\"\n", "delivery.retry_max"),
        (
            "[limits]\nmax_inbox_wait = \"2h\"\n",
            "limits.max_inbox_wait",
        ),
        ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
        ("[limits]\nidle_timeout = \"0s\"\n", "limits.idle_timeout"),
        ("[limits]\nbody_timeout = \"2h\"\n", "limits.body_timeout"),
    ] {
        let e = parse(toml).unwrap_err().to_string();
        assert!(e.contains(key), "{toml:?}: {e}");
    }
}
