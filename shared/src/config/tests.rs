use super::*;
use std::io::Write;

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn load_err(text: &str) -> String {
    let f = file(text);
    load(&[f.path().to_path_buf()]).unwrap_err().to_string()
}

#[test]
fn defaults_are_valid() {
    Config::default().validate().unwrap();
}

#[test]
fn wrong_type_names_key_and_file() {
    let f = file("[node]\nname = \"a\"\noutbound = 15\n");
    let err = load(&[f.path().to_path_buf()]).unwrap_err().to_string();
    assert!(err.contains("node.outbound"), "{err}");
    assert!(err.contains(&*f.path().file_name().unwrap().to_string_lossy()), "{err}");
}

#[test]
fn unknown_key_is_refused_by_name() {
    let err = load_err("[node]\nname = \"a\"\nbogus_key = 1\n");
    assert!(err.contains("bogus_key"), "{err}");
    let err = load_err("[timeouts]\nconect = \"1s\"\n");
    assert!(err.contains("conect"), "{err}");
}

#[test]
fn missing_file_is_named() {
    let err = load(&[PathBuf::from("/nonexistent/q.toml")]).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/q.toml"), "{err}");
}

#[test]
fn later_layers_override_earlier_ones() {
    let a = file("[node]\nname = \"a\"\n[timeouts]\nconnect = \"1s\"\n");
    let b = file("[timeouts]\nconnect = \"250ms\"\n");
    let cfg = load(&[a.path().to_path_buf(), b.path().to_path_buf()]).unwrap();
    assert_eq!(cfg.timeouts.connect, Duration::from_millis(250));
    assert_eq!(cfg.node.unwrap().name, "a");
}

#[test]
fn validation_rules() {
    let cases = [
        ("[node]\nname = \"Bad_Name\"\n", "node.name"),
        ("[[nodes]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n[[nodes]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\n", "nodes[1].name"),
        ("[[services]]\nname = \"s\"\n[[services.endpoints]]\nnode = \"ghost\"\naddress = \"127.0.0.1:1\"\n", "services[0].endpoints[0].node"),
        ("[[services]]\nname = \"s\"\n[[services]]\nname = \"s\"\n", "services[1].name"),
        ("[node]\nname = \"a\"\n[[node.tcp]]\nlisten = \"127.0.0.1:0\"\nservice = \"nope\"\n", "node.tcp[0].service"),
        ("[[services]]\nname = \"web\"\n[node]\nname = \"a\"\n[[node.tcp]]\nlisten = \"127.0.0.1:0\"\nservice = \"web\"\n", "node.tcp[0].service"),
        ("[timeouts]\nconnect = \"0s\"\n", "timeouts"),
        ("[node]\nname = \"a\"\nworkers = 5000\n", "node.workers"),
        ("[node]\nname = \"a\"\ninstance_idle = \"0s\"\n", "node.instance_idle"),
        ("[node]\nname = \"a\"\ninstance_idle = \"2days\"\n", "node.instance_idle"),
        ("[gateway]\nworkers = 5000\n", "gateway.workers"),
        ("[[services]]\nname = \"s\"\nbackend_tls = { ca_certificates = [], hostname = \"a.test\" }\n", "services[0].backend_tls.ca_certificates"),
        ("[[services]]\nname = \"s\"\nbackend_tls = { ca_certificates = [\"/ca.pem\"], hostname = \"not a name\" }\n", "services[0].backend_tls.hostname"),
        ("[gateway]\n[gateway.frontend_validation]\nca_certificates = []\n", "gateway.frontend_validation.ca_certificates"),
        ("[gateway]\n[gateway.limits]\nmax_concurrent_streams = 0\n", "gateway.limits.max_concurrent_streams"),
        ("[gateway]\n[gateway.limits]\nmax_handshakes = 0\n", "gateway.limits.max_handshakes"),
        ("[gateway]\n[gateway.limits]\nmax_connections = 0\n", "gateway.limits.max_connections"),
        ("[gateway]\n[gateway.limits]\nmax_connections_per_client = 0\n", "gateway.limits.max_connections_per_client"),
        ("[transport]\nmax_concurrent_streams = 2000000\n", "transport"),
        ("[transport]\nkeep_alive = \"20s\"\n", "transport.idle_timeout"),
        ("[transport]\nmax_udp_payload = 1000\n", "transport.max_udp_payload"),
        ("[transport]\nmax_ack_delay = \"0s\"\n", "transport.max_ack_delay"),
        ("[transport]\nmax_ack_delay = \"26ms\"\n", "transport.max_ack_delay"),
        ("[transport]\nmax_udp_payload = 65528\n", "transport.max_udp_payload"),
        ("[mesh]\ntrust_domain = \"\"\n", "mesh.trust_domain"),
        ("[[services]]\nname = \"a\"\n[[services]]\nname = \"b\"\nhosts = [\"a\"]\n", "services[1].hosts[0]"),
        ("[[services]]\nname = \"a\"\nhosts = [\"x\"]\n[[services]]\nname = \"b\"\nhosts = [\"X\"]\n", "services[1].hosts[0]"),
        ("[gateway]\n[[gateway.routes]]\nname = \"r\"\n[[gateway.routes.rules]]\nmatches = [{ path = { value = \"x\" } }]\n", "gateway.routes"),
        ("[[services]]\nname = \"s\"\nretry = { attempts = 50 }\n", "services[0].retry"),
        ("[[services]]\nname = \"s\"\nretry = { codes = [42] }\n", "services[0].retry"),
        ("[[services]]\nname = \"s\"\nretry = { budget = { ttl = \"0s\" } }\n", "services[0].retry"),
        ("[[services]]\nname = \"s\"\noutlier = { max_ejected_percent = 101 }\n", "services[0].outlier"),
        ("[[authorization.policies]]\nservice = \"s\"\n[[authorization.policies.rules]]\naction = \"deny\"\npaths = [\"admin\"]\n", "authorization.policies[0].rules[0].paths"),
        ("[[authorization.policies]]\nservice = \"s\"\n[[authorization.policies.rules]]\naction = \"allow\"\nmethods = [\"G ET\"]\n", "authorization.policies[0].rules[0].methods"),
        ("[access_log]\noutput = \"file\"\n", "access_log"),
        ("[[services]]\nname = \"s\"\noutlier = { base_ejection = \"0s\" }\n", "services[0].outlier"),
        ("[node]\nname = \"a\"\n[[node.instances]]\nservice = \"s\"\naddress = \"127.0.0.1:1\"\nhealth = { interval = \"1ms\" }\n", "node.instances[0].health"),
        ("[node]\nname = \"a\"\n[[node.instances]]\nservice = \"s\"\naddress = \"127.0.0.1:1\"\nhealth = { http = \"healthz\" }\n", "node.instances[0].health"),
        ("[node]\nname = \"a\"\n[[node.instances]]\nservice = \"s\"\naddress = \"127.0.0.1:1\"\nhealth = { unhealthy_threshold = 0 }\n", "node.instances[0].health"),
        ("[[services]]\nname = \"s\"\n[gateway]\n[[gateway.routes]]\nname = \"r\"\nrateLimit = { requestsPerSecond = 0 }\n", "gateway.routes"),
        ("[[services]]\nname = \"s\"\n[gateway]\n[[gateway.routes]]\nname = \"r\"\n[[gateway.routes.rules]]\nfault = { abort = { percent = 120, httpStatus = 503 } }\n", "gateway.routes"),
        ("[[services]]\nname = \"s\"\n[gateway]\n[[gateway.routes]]\nname = \"r\"\n[[gateway.routes.rules]]\nfault = { abort = { percent = 1, httpStatus = 99 } }\n", "gateway.routes"),
        ("[[services]]\nname = \"s\"\n[gateway]\n[[gateway.routes]]\nname = \"r\"\n[[gateway.routes.rules]]\nretry = { codes = [700] }\n", "gateway.routes"),
        // Times long enough to overflow a clock reading, and limits that panic or abort where
        // they are used: refused here instead.
        ("[gateway]\n[gateway.limits]\nmax_headers = 0\n", "gateway.limits.max_headers"),
        ("[gateway]\n[gateway.limits]\nmax_headers = 1000000000000\n", "gateway.limits.max_headers"),
        ("[gateway]\n[gateway.limits]\nheader_read_timeout = \"10000000000000000000s\"\n", "gateway.limits.header_read_timeout"),
        ("[gateway]\n[gateway.limits]\nidle_timeout = \"0s\"\n", "gateway.limits.idle_timeout"),
        ("[gateway]\n[gateway.limits]\nidle_timeout = \"11years\"\n", "gateway.limits.idle_timeout"),
        ("[gateway]\ndrain_timeout = \"11years\"\n", "gateway.drain_timeout"),
        ("[gateway]\nnode_grace = \"11years\"\n", "gateway.node_grace"),
        ("[gateway]\nwatch_interval = \"0s\"\n", "gateway.watch_interval"),
        ("[node]\nname = \"a\"\ndrain_timeout = \"11years\"\n", "node.drain_timeout"),
        ("[timeouts]\nrequest = \"10000000000000000000s\"\n", "timeouts.request"),
        ("[timeouts]\ntcp_idle = \"11years\"\n", "timeouts.tcp_idle"),
        ("[node]\nname = \"a\"\nrenew_before = \"11years\"\n", "node.renew_before"),
        ("[[services]]\nname = \"s\"\nretry = { backoff = \"11years\", max_backoff = \"12years\" }\n", "services[0].retry"),
        ("[[services]]\nname = \"s\"\n[gateway]\n[[gateway.routes]]\nname = \"r\"\n[[gateway.routes.rules]]\nretry = { backoff = \"11years\" }\n", "gateway.routes"),
        ("[[services]]\nname = \"s\"\n[gateway]\n[[gateway.routes]]\nname = \"r\"\n[[gateway.routes.rules]]\nfault = { delay = { percent = 1.0, fixedDelay = \"11years\" } }\n", "gateway.routes"),
        ("[transport]\nkeep_alive = \"11years\"\nidle_timeout = \"12years\"\n", "transport.keep_alive"),
        ("[[services]]\nname = \"s\"\noutlier = { max_ejection = \"11years\" }\n", "services[0].outlier"),
        ("[node]\nname = \"a\"\n[[node.instances]]\nservice = \"s\"\naddress = \"127.0.0.1:1\"\nhealth = { timeout = \"11years\" }\n", "node.instances[0].health"),
        ("[[services]]\nname = \"s\"\n[gateway]\n[[gateway.routes]]\nname = \"r\"\n[[gateway.routes.rules]]\ntimeouts = { request = \"11years\" }\n", "gateway.routes"),
        ("[[services]]\nname = \"s\"\n[gateway]\n[[gateway.routes]]\nname = \"r\"\n[[gateway.routes.rules]]\ntimeouts = { streamIdle = \"11years\" }\n", "gateway.routes"),
    ];
    for (text, key) in cases {
        let err = load_err(text);
        assert!(err.contains(&format!("\"{key}\"")), "expected key {key} in: {err}");
    }
}

#[test]
fn the_longest_times_allowed_are_accepted() {
    // "10y" as humantime counts years, the bound of every time that has one.
    let text = "[timeouts]\nrequest = \"10y\"\n[[services]]\nname = \"s\"\noutlier = { max_ejection = \"10y\" }\n";
    assert!(from_toml(text).is_ok(), "{:?}", from_toml(text).err());
}

#[test]
fn validation_errors_name_the_file() {
    let f = file("[node]\nname = \"Bad_Name\"\n");
    let err = load(&[f.path().to_path_buf()]).unwrap_err().to_string();
    assert!(err.contains(&*f.path().file_name().unwrap().to_string_lossy()), "{err}");
}

/// Every file in config/ parses: standalone ones alone, per-node and gateway layers on top of
/// the mesh-wide layer, as the README shows.
#[test]
fn example_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mesh = dir.join("mesh.toml");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let layers = match name.as_str() {
            "mesh.toml" | "demo.toml" => vec![path.clone()],
            _ => vec![mesh.clone(), path.clone()],
        };
        let mut cfg = load(&layers).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Overlay paths are relative to the repository root, where the README runs commands.
        if let Some(overlays) = cfg.gateway.as_ref().and_then(|g| g.overlays.clone()) {
            let root = dir.parent().unwrap().join(overlays);
            crate::config::overlay::apply_services(&mut cfg, &root).unwrap();
            let nodes = crate::config::overlay::node_settings(&cfg, &root).unwrap();
            assert!(!nodes.is_empty() && cfg.service("web").unwrap().hosts.len() == 2, "overlays not applied");
        }
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} example configs");
}

/// Hostile finding 13: sizes are bounded, each error names the limit, and no error echoes a
/// huge value or line.
#[test]
fn size_limits_name_what_was_exceeded() {
    let long_domain = format!("[mesh]\ntrust_domain = \"{}\"\n", "a".repeat(1 << 20));
    let err = from_toml(&long_domain).unwrap_err().to_string();
    assert!(err.contains("mesh.trust_domain") && err.contains("longer than 255"), "{}", &err[..err.len().min(300)]);
    assert!(err.len() < 1024, "the error echoes the value: {} bytes", err.len());
    let routes: String =
        (0..MAX_ROUTES + 1).map(|i| format!("[[routes]]\nname = \"r{i}\"\nhostnames = [\"h{i}\"]\n")).collect();
    let err = from_toml(&routes).unwrap_err().to_string();
    assert!(err.contains("\"routes\"") && err.contains("more than 10000"), "{err}");
    let bad_line = format!("[mesh]\ntrust_domain = {}\n", "x".repeat(200 << 10));
    let err = from_toml(&bad_line).unwrap_err().to_string();
    assert!(err.len() < 2048, "a parse error echoes a 200 KB line: {} bytes", err.len());
    let big = file(&format!("# {}\n", "x".repeat(MAX_FILE_BYTES as usize)));
    let err = load(&[big.path().to_path_buf()]).unwrap_err().to_string();
    assert!(err.contains("more than the limit of 8388608"), "{err}");
}

#[test]
fn control_addresses_are_ip_or_name_and_port() {
    let parsed = |s: &str| s.parse::<HostPort>();
    assert_eq!(parsed("10.0.0.1:15012").unwrap().to_string(), "10.0.0.1:15012");
    assert_eq!(parsed("[::1]:15012").unwrap().to_string(), "[::1]:15012");
    assert_eq!(parsed("GW.Mesh.example:15012").unwrap(), HostPort { host: "gw.mesh.example".into(), port: 15012 });
    for bad in ["gw.example", "gw.example:99999", ":15012", "gw example:1", "gw..example:1", "gw_x:1"] {
        assert!(parsed(bad).unwrap_err().contains("is not HOST:PORT"), "{bad}");
    }
    // In a config file, and named in the error.
    let err = load_err("[node]\nname = \"a\"\n[node.gateway]\naddress = \"gw example:1\"\n");
    assert!(err.contains("is not HOST:PORT"), "{err}");
}

#[test]
fn shared_layers_go_over_the_files_and_set_only_mesh_wide_sections() {
    let f = file("[[services]]\nname = \"web\"\n[timeouts]\nconnect = \"3s\"\n");
    let layer = |text: &str| Layer { name: "shared.toml".into(), text: text.into() };
    let cfg = load_with(&[f.path().to_path_buf()], &[layer("[[services]]\nname = \"api\"\n")]).unwrap();
    // Arrays are replaced whole; what the layer does not set stays.
    assert_eq!(cfg.services.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["api"]);
    assert_eq!(cfg.timeouts.connect, Duration::from_secs(3));
    let src = sources_with(&[f.path().to_path_buf()], &[layer("[[services]]\nname = \"api\"\n")]).unwrap();
    assert_eq!(src["services"], "shared layer shared.toml");
    for own in ["[gateway]\nname = \"x\"\n", "[node]\nname = \"x\"\n", "[transport]\nkeep_alive = \"1s\"\n"] {
        let err = layer(own).check().unwrap_err().to_string();
        assert!(err.contains("is each process's own setting") && err.contains("shared.toml"), "{err}");
    }
    assert!(layer("[[services]\n").check().unwrap_err().to_string().contains("shared.toml"));
}

#[test]
fn a_route_to_an_unknown_service_is_accepted_with_a_warning() {
    let f = file(
        "[gateway]\n[[gateway.routes]]\nname = \"r\"\n[[gateway.routes.rules]]\nbackendRefs = [{ name = \"s\" }]\n",
    );
    let cfg = load(&[f.path().to_path_buf()]).unwrap();
    let warnings = cfg.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("gateway.routes[0].rules[0].backendRefs[0].name: unknown service \"s\""),
        "{warnings:?}"
    );
}

#[test]
fn parent_refs_fit_the_routes_they_are_on() {
    let mesh = "[[routes]]\nname = \"m\"\nparentRefs = [{ sectionName = \"https\" }]\n";
    assert!(load_err(mesh).contains("a mesh route's parentRefs name services"), "{}", load_err(mesh));
    let edge = "[gateway]\n[[gateway.routes]]\nname = \"e\"\nparentRefs = [{ kind = \"Service\", name = \"web\" }]\n";
    assert!(load_err(edge).contains("a Service parentRef is for mesh routes"), "{}", load_err(edge));
    let listeners = "[gateway]\n[[gateway.listeners]]\nname = \"a\"\nport = 80\nprotocol = \"HTTP\"\n\
                     [[gateway.listeners]]\nname = \"b\"\nport = 80\nprotocol = \"TCP\"\n";
    assert!(load_err(listeners).contains("already speaks HTTP"), "{}", load_err(listeners));
    let binds = "[gateway]\n[[gateway.listeners]]\nname = \"a\"\nport = 80\nlisten = \"127.0.0.1:80\"\nprotocol = \"HTTP\"\n\
                 [[gateway.listeners]]\nname = \"b\"\nport = 80\nlisten = \"127.0.0.2:80\"\nprotocol = \"HTTP\"\nhostname = \"b.test\"\n";
    assert!(load_err(binds).contains("port 80 already binds"), "{}", load_err(binds));
}

#[test]
fn jwt_providers_load_and_routes_name_one() {
    let provider = |extra: &str| {
        format!("[gateway]\n[[gateway.jwt_providers]]\nname = \"main\"\nissuer = \"https://i.test\"\n{extra}")
    };
    let unknown = format!(
        "{}[[gateway.routes]]\nname = \"r\"\njwt = \"other\"\n",
        provider("jwks_uri = \"https://i.test/keys\"\n")
    );
    assert!(load_err(&unknown).contains("no gateway.jwt_providers entry is named \"other\""), "{}", load_err(&unknown));
    let neither = provider("");
    assert!(load_err(&neither).contains("give one of jwks_file and jwks_uri"), "{}", load_err(&neither));
    let plain = provider("jwks_uri = \"http://i.test/keys\"\n");
    assert!(load_err(&plain).contains("is not an https:// URL"), "{}", load_err(&plain));
    let bad_set = file("{\"not\": \"a key set\"}");
    let unreadable = provider(&format!("jwks_file = \"{}\"\n", bad_set.path().display()));
    assert!(load_err(&unreadable).contains("no \"keys\" array"), "{}", load_err(&unreadable));
    let mesh = "[[routes]]\nname = \"m\"\njwt = \"main\"\n";
    assert!(load_err(mesh).contains("jwt is for gateway routes"), "{}", load_err(mesh));
}

#[test]
fn external_auth_speaks_http_only() {
    let route = |auth: &str| {
        format!("[[routes]]\nname = \"r\"\n[[routes.rules]]\nfilters = [{{ type = \"ExternalAuth\", externalAuth = {{ {auth} }} }}]\n")
    };
    let grpc = route("protocol = \"GRPC\", backendRef = { name = \"authz\" }");
    assert!(load_err(&grpc).contains("only HTTP is spoken"), "{}", load_err(&grpc));
    let header =
        route("protocol = \"HTTP\", backendRef = { name = \"authz\" }, http = { allowedHeaders = [\"bad header\"] }");
    assert!(load_err(&header).contains("is not a header name"), "{}", load_err(&header));
    let path = route("protocol = \"HTTP\", backendRef = { name = \"authz\" }, http = { path = \"check\" }");
    assert!(load_err(&path).contains("must start with '/'"), "{}", load_err(&path));
}

#[test]
fn acme_needs_an_https_directory_and_names_it_can_certify() {
    let https = "[[gateway.listeners]]\nname = \"web\"\nport = 443\nprotocol = \"HTTPS\"\nhostname = \"www.example.com\"\n\n\
                 [[gateway.listeners]]\nname = \"any\"\nport = 443\nprotocol = \"HTTPS\"\nhostname = \"*.example.com\"\n\n\
                 [[gateway.listeners]]\nname = \"own\"\nport = 443\nprotocol = \"HTTPS\"\nhostname = \"own.example.com\"\n\
                 certificates = [{ cert = \"c.pem\", key = \"k.pem\" }]\n\n";
    let acme = |listeners: &str, extra: &str| {
        format!(
            "[gateway]\n[gateway.tls]\nstate_dir = \"/tmp/qm\"\n{listeners}[gateway.acme]\ndirectory = \"https://ca.test/dir\"\n{extra}"
        )
    };
    // Every hostname of an HTTPS listener without certificates, wildcards left out.
    let f = file(&acme(https, ""));
    let cfg = load(&[f.path().to_path_buf()]).unwrap();
    assert_eq!(cfg.gateway.unwrap().acme_hostnames(), ["www.example.com"]);
    let plain = acme(https, "").replace("https://ca.test", "http://ca.test");
    assert!(load_err(&plain).contains("is not an https:// URL"), "{}", load_err(&plain));
    let nothing = acme("", "");
    assert!(load_err(&nothing).contains("nothing to certify"), "{}", load_err(&nothing));
    let wildcard = acme("", "hostnames = [\"*.example.com\"]\n");
    assert!(load_err(&wildcard).contains("is not a DNS name ACME can certify"), "{}", load_err(&wildcard));
    let http01 = acme(https, "challenge = \"http-01\"\n");
    assert!(load_err(&http01).contains("has none"), "{}", load_err(&http01));
    let unknown = acme(https, "challenge = \"dns-01\"\n");
    assert!(load_err(&unknown).contains("challenge"), "{}", load_err(&unknown));
    let backoff = acme(https, "retry_initial = \"1h\"\nretry_max = \"1m\"\n");
    assert!(load_err(&backoff).contains("at most retry_max"), "{}", load_err(&backoff));
}

#[test]
fn kubernetes_service_link_variables_are_not_config_keys() {
    // What Kubernetes sets in every pod for a Service `quicmesh-edge` (prefix removed).
    for key in [
        "edge_service_host",
        "edge_service_port",
        "edge_service_port_https",
        "edge_port",
        "edge_port_8443_tcp",
        "edge_port_8443_udp_proto",
        "edge_port_8443_udp_port",
        "edge_port_8443_tcp_addr",
        "CONTROL_PORT_15012_UDP",
    ] {
        assert!(service_link(key), "{key}");
    }
    // Config keys, and mistakes that must still be reported as unknown keys.
    for key in [
        "node.admin",
        "node__admin",
        "transport.socket_buffer",
        "timeouts",
        "edge_port_x_tcp",
        "edge_port_80_tcp_other",
    ] {
        assert!(!service_link(key), "{key}");
    }
}

#[test]
fn a_reload_names_the_changed_keys_that_wait_for_a_restart() {
    let before = load(&[file("[gateway]\n[[gateway.routes]]\nname = \"a\"\n[[services]]\nname = \"web\"\n")
        .path()
        .to_path_buf()])
    .unwrap();
    let after = load(&[file(
        "[gateway]\nadmin = \"127.0.0.1:9999\"\n[[gateway.routes]]\nname = \"b\"\n[[services]]\nname = \"web\"\nmax_requests = 7\n\
         [transport]\nkeep_alive = \"800ms\"\n[timeouts]\nrequest = \"3s\"\nconnect = \"1s\"\n",
    )
    .path()
    .to_path_buf()])
    .unwrap();
    // Routes, services and the request timeout apply at once; these do not.
    assert_eq!(
        reference::changes_needing_restart(&before, &after),
        ["gateway.admin", "timeouts.connect", "transport.keep_alive"]
    );
    assert!(reference::changes_needing_restart(&before, &before).is_empty());
}

#[test]
fn member_names_are_dns_names_and_service_names_one_label() {
    for good in ["node-a", "ip-10-0-0-5.ec2.internal", "a.b.c", &"a".repeat(63)] {
        assert!(valid_node_name(good), "{good}");
    }
    let long = format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(63));
    for bad in ["", "a..b", ".a", "a.", "Node.example", "-a.b", "a_b.c", &"a".repeat(64), &long] {
        assert!(!valid_node_name(bad), "{bad}");
    }
    // Services keep one label: their names are also hosts local apps send to.
    assert!(!valid_name("web.internal"));
    let dotted = "[node]\nname = \"ip-10-0-0-5.ec2.internal\"\n[[services]]\nname = \"web\"\n";
    assert_eq!(load(&[file(dotted).path().to_path_buf()]).unwrap().node.unwrap().name, "ip-10-0-0-5.ec2.internal");
    assert!(load_err("[[services]]\nname = \"web.internal\"\n").contains("services[0].name"));
}

#[test]
fn congestion_controllers_by_name() {
    let f = file("[transport]\ncongestion = \"bbr\"\nmax_udp_payload = 8952\n");
    let cfg = load(&[f.path().to_path_buf()]).unwrap();
    assert_eq!(cfg.transport.congestion, super::Congestion::Bbr);
    assert_eq!(cfg.transport.max_udp_payload, 8952);
    crate::transport::transport_config(&cfg.transport).unwrap();
    let err = load_err("[transport]\ncongestion = \"vegas\"\n");
    assert!(err.contains("congestion") && err.contains("vegas"), "{err}");
}

#[test]
fn a_listeners_allowed_routes_keep_other_kinds_off_it() {
    let listener = |kinds: &str| {
        format!(
            "[gateway]\n[[gateway.listeners]]\nname = \"t\"\nport = 443\nprotocol = \"TLS\"\ntls_mode = \"Terminate\"\n\
             certificates = [{{ cert = \"c.pem\", key = \"k.pem\" }}]\n{kinds}\n\
             [[gateway.tls_routes]]\nname = \"by-name\"\nhostnames = [\"db.test\"]\nbackendRefs = [{{ name = \"db\" }}]\n\
             [[gateway.tcp_routes]]\nname = \"whole\"\nbackendRefs = [{{ name = \"db\" }}]\n\
             [[services]]\nname = \"db\"\nprotocol = \"tcp\"\n"
        )
    };
    let warned = |kinds: &str| {
        let f = file(&listener(kinds));
        let cfg = load(&[f.path().to_path_buf()]).unwrap();
        cfg.warnings().into_iter().filter(|w| w.contains("attaches to no listener")).collect::<Vec<_>>()
    };
    // By default a terminating TLS listener takes both kinds.
    assert!(warned("").is_empty(), "{:?}", warned(""));
    // Narrowed to TCPRoute: the TLSRoute attaches nowhere, and says so.
    let w = warned("allowed_routes = [\"TCPRoute\"]");
    assert!(w.len() == 1 && w[0].contains("\"by-name\""), "{w:?}");
    let w = warned("allowed_routes = [\"TLSRoute\"]");
    assert!(w.len() == 1 && w[0].contains("\"whole\""), "{w:?}");
    // A kind the protocol cannot carry is refused.
    let err = load_err(&listener("allowed_routes = [\"HTTPRoute\"]"));
    assert!(err.contains("cannot take HTTPRoute"), "{err}");
}

/// What the gateway sends nodes leaves `timeouts.tcp_idle` out at its default: a node of a
/// release before it refuses fields it does not know, and would take no snapshot at all.
#[test]
fn timeouts_at_their_defaults_are_sent_as_older_nodes_read_them() {
    let sent = serde_json::to_value(crate::config::Timeouts::default()).unwrap();
    let keys: Vec<&str> = sent.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["connect", "request"]);
    let set = crate::config::Timeouts { tcp_idle: Duration::from_secs(60), ..Default::default() };
    let back: crate::config::Timeouts = serde_json::from_value(serde_json::to_value(&set).unwrap()).unwrap();
    assert_eq!(back, set);
    let default: crate::config::Timeouts = serde_json::from_value(sent).unwrap();
    assert_eq!(default.tcp_idle, Duration::from_secs(3600));
    // The reference's default is written by hand beside the field (it is not serialized).
    let schema = serde_json::to_value(schemars::schema_for!(crate::config::Timeouts)).unwrap();
    let said = schema["properties"]["tcp_idle"]["default"].as_str().unwrap().to_string();
    assert_eq!(humantime::parse_duration(&said).unwrap(), DEFAULT_TCP_IDLE, "{schema}");
}
