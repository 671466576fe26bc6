use super::*;

fn raw() -> RawPlan<'static> {
    RawPlan {
        proxy_uid: "2102",
        inbound_port: "4143",
        outbound_port: "4140",
        admin_port: "4191",
        skip_inbound_ports: "",
        skip_outbound_ports: "",
        skip_outbound_cidrs: "",
        ipv6: true,
    }
}

fn plan_with(tweak: impl FnOnce(&mut RawPlan<'static>)) -> Plan {
    let mut r = raw();
    tweak(&mut r);
    Plan::parse(&r).unwrap()
}

#[test]
fn default_rules_v4() {
    let text = render(&plan_with(|_| {}), Family::V4, Present::default());
    let want = "\
# musubi-proxy init: redirect the pod's TCP through the proxy
*nat
:MUSUBI_PREROUTING - [0:0]
:MUSUBI_INBOUND_REDIRECT - [0:0]
:MUSUBI_OUTPUT - [0:0]
:MUSUBI_OUTBOUND_REDIRECT - [0:0]
-F MUSUBI_PREROUTING
-F MUSUBI_INBOUND_REDIRECT
-F MUSUBI_OUTPUT
-F MUSUBI_OUTBOUND_REDIRECT
-A MUSUBI_PREROUTING -p tcp --dport 4140 -j RETURN
-A MUSUBI_PREROUTING -p tcp --dport 4143 -j RETURN
-A MUSUBI_PREROUTING -p tcp --dport 4191 -j RETURN
-A MUSUBI_PREROUTING -p tcp -j MUSUBI_INBOUND_REDIRECT
-A MUSUBI_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4143
-A MUSUBI_OUTPUT -m owner --uid-owner 2102 -j RETURN
-A MUSUBI_OUTPUT -o lo -j RETURN
-A MUSUBI_OUTPUT -d 127.0.0.0/8 -j RETURN
-A MUSUBI_OUTPUT -p tcp -j MUSUBI_OUTBOUND_REDIRECT
-A MUSUBI_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4140
-A PREROUTING -p tcp -j MUSUBI_PREROUTING
-A OUTPUT -p tcp -j MUSUBI_OUTPUT
COMMIT
";
    assert_eq!(text, want);
}

/// (what the case is, tweak, family, lines that must be there, lines that must not)
type Case = (
    &'static str,
    fn(&mut RawPlan<'static>),
    Family,
    &'static [&'static str],
    &'static [&'static str],
);

#[test]
fn rule_table() {
    let cases: Vec<Case> = vec![
        (
            "ipv6 loopback",
            |_| {},
            Family::V6,
            &["-A MUSUBI_OUTPUT -d ::1/128 -j RETURN"],
            &["127.0.0.0/8"],
        ),
        (
            "custom uid and ports",
            |r| {
                r.proxy_uid = "1337";
                r.inbound_port = "15006";
                r.outbound_port = "15001";
                r.admin_port = "15000";
            },
            Family::V4,
            &[
                "-A MUSUBI_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A MUSUBI_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
                "-A MUSUBI_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
                "-A MUSUBI_PREROUTING -p tcp --dport 15000 -j RETURN",
                "-A MUSUBI_PREROUTING -p tcp --dport 15006 -j RETURN",
            ],
            &["2102", "4143", "4140", "4191"],
        ),
        (
            "skipped inbound ports and ranges",
            |r| r.skip_inbound_ports = "22, 8000-8100,22",
            Family::V4,
            &[
                "-A MUSUBI_PREROUTING -p tcp --dport 22 -j RETURN",
                "-A MUSUBI_PREROUTING -p tcp --dport 8000:8100 -j RETURN",
            ],
            &[],
        ),
        (
            "skipped outbound ports",
            |r| r.skip_outbound_ports = "25,587,3306-3307",
            Family::V6,
            &[
                "-A MUSUBI_OUTPUT -p tcp --dport 25 -j RETURN",
                "-A MUSUBI_OUTPUT -p tcp --dport 587 -j RETURN",
                "-A MUSUBI_OUTPUT -p tcp --dport 3306:3307 -j RETURN",
            ],
            &[],
        ),
        (
            "v4 CIDRs go to iptables only",
            |r| r.skip_outbound_cidrs = "10.0.0.0/8,169.254.169.254,fd00::/8",
            Family::V4,
            &[
                "-A MUSUBI_OUTPUT -d 10.0.0.0/8 -j RETURN",
                "-A MUSUBI_OUTPUT -d 169.254.169.254/32 -j RETURN",
            ],
            &["fd00::/8"],
        ),
        (
            "v6 CIDRs go to ip6tables only",
            |r| r.skip_outbound_cidrs = "10.0.0.0/8,fd00::/8,2001:db8::1",
            Family::V6,
            &[
                "-A MUSUBI_OUTPUT -d fd00::/8 -j RETURN",
                "-A MUSUBI_OUTPUT -d 2001:db8::1/128 -j RETURN",
            ],
            &["10.0.0.0/8"],
        ),
    ];
    for (what, tweak, family, must, must_not) in cases {
        let text = render(&plan_with(tweak), family, Present::default());
        let lines: Vec<&str> = text.lines().collect();
        for m in must {
            assert!(lines.contains(m), "{what}: missing {m:?} in\n{text}");
        }
        for m in must_not {
            assert!(!text.contains(m), "{what}: unexpected {m:?} in\n{text}");
        }
        // The skips come before the catch-all redirect in each chain.
        let pos = |l: &str| lines.iter().position(|x| *x == l).unwrap();
        let catch_all = pos("-A MUSUBI_OUTPUT -p tcp -j MUSUBI_OUTBOUND_REDIRECT");
        assert!(
            lines
                .iter()
                .enumerate()
                .filter(|(_, l)| l.starts_with("-A MUSUBI_OUTPUT") && l.ends_with("RETURN"))
                .all(|(i, _)| i < catch_all),
            "{what}: a RETURN after the redirect"
        );
    }
}

#[test]
fn jumps_are_not_repeated() {
    let plan = plan_with(|_| {});
    let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:MUSUBI_PREROUTING - [0:0]\n\
        -A PREROUTING -p tcp -j MUSUBI_PREROUTING\n\
        -A OUTPUT -j KUBE-SERVICES\n\
        -A OUTPUT -p tcp -j MUSUBI_OUTPUT\nCOMMIT\n";
    let p = present(saved);
    assert_eq!(
        p,
        Present {
            prerouting_jump: true,
            output_jump: true
        }
    );
    let text = render(&plan, Family::V4, p);
    assert!(!text.contains("-A PREROUTING"), "{text}");
    assert!(!text.contains("-A OUTPUT"), "{text}");
    // Our chains are still declared and flushed, so the rerun replaces them.
    assert!(text.contains("-F MUSUBI_OUTPUT\n"));

    let only_pre = present("-A PREROUTING -p tcp -j MUSUBI_PREROUTING\n");
    let text = render(&plan, Family::V4, only_pre);
    assert_eq!(text.matches(PREROUTING_JUMP).count(), 0);
    assert_eq!(text.matches(OUTPUT_JUMP).count(), 1);
    assert_eq!(present(""), Present::default());
}

#[test]
fn dry_run_text_has_both_families() {
    let all = render_all(&plan_with(|_| {}));
    assert_eq!(all.matches("*nat").count(), 2);
    assert!(all.contains("::1/128"));
    let v4_only = render_all(&plan_with(|r| r.ipv6 = false));
    assert_eq!(v4_only.matches("*nat").count(), 1);
}

#[test]
fn bad_arguments() {
    let cases: Vec<(fn(&mut RawPlan<'static>), &str, &str)> = vec![
        (|r| r.proxy_uid = "nobody", "--proxy-uid", "not a user id"),
        (|r| r.proxy_uid = "-1", "--proxy-uid", "not a user id"),
        (|r| r.inbound_port = "0", "--inbound-port", "not a port"),
        (
            |r| r.outbound_port = "70000",
            "--outbound-port",
            "not a port",
        ),
        (
            |r| r.outbound_port = "4143",
            "--outbound-port",
            "must differ",
        ),
        (|r| r.admin_port = "x", "--admin-port", "not a port"),
        (
            |r| r.skip_inbound_ports = "22,abc",
            "--skip-inbound-ports",
            "\"abc\" is not a port",
        ),
        (
            |r| r.skip_inbound_ports = "9000-8000",
            "--skip-inbound-ports",
            "not a range",
        ),
        (
            |r| r.skip_outbound_ports = "1-",
            "--skip-outbound-ports",
            "not a port",
        ),
        (
            |r| r.skip_outbound_ports = "1-2-3",
            "--skip-outbound-ports",
            "not a port",
        ),
        (
            |r| r.skip_outbound_cidrs = "10.0.0.0/33",
            "--skip-outbound-cidrs",
            "prefix must be 0-32",
        ),
        (
            |r| r.skip_outbound_cidrs = "fd00::/129",
            "--skip-outbound-cidrs",
            "prefix must be 0-128",
        ),
        (
            |r| r.skip_outbound_cidrs = "10.0.0/8",
            "--skip-outbound-cidrs",
            "bad address",
        ),
        (
            |r| r.skip_outbound_cidrs = "10.0.0.0/",
            "--skip-outbound-cidrs",
            "prefix",
        ),
    ];
    for (tweak, flag, says) in cases {
        let mut r = raw();
        tweak(&mut r);
        let e = Plan::parse(&r).unwrap_err();
        assert_eq!(e.flag, flag, "{e}");
        assert!(e.to_string().contains(says), "{flag}: {e}");
    }
}

#[test]
fn ranges_parse() {
    assert_eq!(
        parse_ports("f", "25,587,8000-8100").unwrap(),
        vec![
            PortRange::one(25),
            PortRange::one(587),
            PortRange {
                first: 8000,
                last: 8100
            }
        ]
    );
    assert!(parse_ports("f", " , ").unwrap().is_empty());
    assert_eq!(
        parse_cidrs("f", "0.0.0.0/0").unwrap()[0].to_string(),
        "0.0.0.0/0"
    );
}
