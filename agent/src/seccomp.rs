//! OCI seccomp profiles (`linux.seccomp`) translated to a classic BPF program for
//! seccomp(SECCOMP_SET_MODE_FILTER).
//!
//! The program checks the architecture (x86_64 only; other ABIs get ENOSYS), then
//! finds the syscall number in a binary search tree (a few comparisons even for a
//! profile of hundreds of calls, since every system call the container makes runs
//! the filter) that leads to that number's chain: its rules in the profile's order,
//! one block each, where the first block whose argument conditions hold returns the
//! rule's action. A number with no rule, or whose chain finds no match, gets the
//! default action. This is the same first-match-in-profile-order outcome as testing
//! every rule in turn. Syscall names this kernel's table does
//! not know are skipped (as runc does: profiles name syscalls of newer kernels); an
//! unknown action, operator or flag is an error.

use std::collections::BTreeMap;

use crate::error::{AgentError, Result};
use crate::spec::{Seccomp, SyscallArg};

/// One classic BPF instruction (struct sock_filter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// A compiled filter and the flags to install it with.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Filter {
    /// (code, jt, jf, k) per instruction.
    pub insns: Vec<(u16, u8, u8, u32)>,
    pub flags: u32,
}

const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGT_K: u16 = 0x25;
const JGE_K: u16 = 0x35;
const AND_K: u16 = 0x54;
const RET_K: u16 = 0x06;
/// An unconditional jump by k instructions (32 bits: conditional jumps reach only 255).
const JA: u16 = 0x05;
/// Syscall numbers a leaf of the search tree tests one after another.
const LEAF: usize = 4;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const RET_KILL_THREAD: u32 = 0;
pub const RET_TRAP: u32 = 0x0003_0000;
pub const RET_ERRNO: u32 = 0x0005_0000;
pub const RET_TRACE: u32 = 0x7ff0_0000;
pub const RET_LOG: u32 = 0x7ffc_0000;
pub const RET_ALLOW: u32 = 0x7fff_0000;

/// The kernel's limit on one filter's length (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;

fn invalid(msg: String) -> AgentError {
    AgentError::InvalidArgument(msg)
}

fn stmt(code: u16, k: u32) -> Insn {
    Insn { code, jt: 0, jf: 0, k }
}

/// The seccomp return value of an OCI action; `errno` is the rule's errnoRet.
pub fn action(name: &str, errno: Option<u32>) -> Result<u32> {
    let data = |e: Option<u32>, default: u32| e.unwrap_or(default) & 0xffff;
    Ok(match name {
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => RET_KILL_THREAD,
        "SCMP_ACT_KILL_PROCESS" => RET_KILL_PROCESS,
        "SCMP_ACT_TRAP" => RET_TRAP,
        "SCMP_ACT_ERRNO" => RET_ERRNO | data(errno, libc::EPERM as u32),
        "SCMP_ACT_TRACE" => RET_TRACE | data(errno, libc::EPERM as u32),
        "SCMP_ACT_LOG" => RET_LOG,
        "SCMP_ACT_ALLOW" => RET_ALLOW,
        "SCMP_ACT_NOTIFY" => return Err(invalid("spec.linux.seccomp: SCMP_ACT_NOTIFY is not supported".into())),
        other => return Err(invalid(format!("spec.linux.seccomp: unknown action {other:?}"))),
    })
}

/// A jump target inside one rule block while it is being built.
#[derive(Clone, Copy)]
enum To {
    /// Fall through to the next instruction, or skip n instructions.
    Skip(u8),
    /// The first instruction after the block: the rule does not match.
    Fail,
}

struct Block(Vec<(u16, To, To, u32)>);

impl Block {
    fn ld(&mut self, off: u32) {
        self.0.push((LD_W_ABS, To::Skip(0), To::Skip(0), off));
    }
    fn jmp(&mut self, code: u16, k: u32, jt: To, jf: To) {
        self.0.push((code, jt, jf, k));
    }
    fn alu(&mut self, code: u16, k: u32) {
        self.0.push((code, To::Skip(0), To::Skip(0), k));
    }
    /// Resolves Fail targets; the block ends with `ret`.
    fn finish(mut self, ret: u32, out: &mut Vec<Insn>) -> Result<()> {
        self.0.push((RET_K, To::Skip(0), To::Skip(0), ret));
        let len = self.0.len();
        for (i, (code, jt, jf, k)) in self.0.into_iter().enumerate() {
            let resolve = |t: To| -> Result<u8> {
                match t {
                    To::Skip(n) => Ok(n),
                    To::Fail => u8::try_from(len - 1 - i)
                        .map_err(|_| invalid("spec.linux.seccomp: a rule is too long to compile".into())),
                }
            };
            out.push(Insn { code, jt: resolve(jt)?, jf: resolve(jf)?, k });
        }
        Ok(())
    }
}

/// Appends the test of one argument condition; falls through when it holds.
fn arg_check(b: &mut Block, a: &SyscallArg) -> Result<()> {
    if a.index > 5 {
        return Err(invalid(format!("spec.linux.seccomp: argument index {} is above 5", a.index)));
    }
    let lo_off = OFF_ARGS + 8 * a.index;
    let hi_off = lo_off + 4;
    let (vh, vl) = ((a.value >> 32) as u32, a.value as u32);
    match a.op.as_str() {
        "SCMP_CMP_EQ" => {
            b.ld(hi_off);
            b.jmp(JEQ_K, vh, To::Skip(0), To::Fail);
            b.ld(lo_off);
            b.jmp(JEQ_K, vl, To::Skip(0), To::Fail);
        }
        "SCMP_CMP_NE" => {
            b.ld(hi_off);
            b.jmp(JEQ_K, vh, To::Skip(0), To::Skip(2));
            b.ld(lo_off);
            b.jmp(JEQ_K, vl, To::Fail, To::Skip(0));
        }
        "SCMP_CMP_MASKED_EQ" => {
            let (wh, wl) = ((a.value_two >> 32) as u32, a.value_two as u32);
            b.ld(hi_off);
            b.alu(AND_K, vh);
            b.jmp(JEQ_K, wh, To::Skip(0), To::Fail);
            b.ld(lo_off);
            b.alu(AND_K, vl);
            b.jmp(JEQ_K, wl, To::Skip(0), To::Fail);
        }
        op @ ("SCMP_CMP_GT" | "SCMP_CMP_GE") => {
            // hi > vh: holds; hi == vh: compare the low words; hi < vh: fails.
            b.ld(hi_off);
            b.jmp(JGT_K, vh, To::Skip(3), To::Skip(0));
            b.jmp(JEQ_K, vh, To::Skip(0), To::Fail);
            b.ld(lo_off);
            b.jmp(if op == "SCMP_CMP_GT" { JGT_K } else { JGE_K }, vl, To::Skip(0), To::Fail);
        }
        op @ ("SCMP_CMP_LT" | "SCMP_CMP_LE") => {
            // hi < vh: holds; hi == vh: compare the low words; hi > vh: fails.
            b.ld(hi_off);
            b.jmp(JGE_K, vh, To::Skip(0), To::Skip(3));
            b.jmp(JEQ_K, vh, To::Skip(0), To::Fail);
            b.ld(lo_off);
            b.jmp(if op == "SCMP_CMP_LT" { JGE_K } else { JGT_K }, vl, To::Fail, To::Skip(0));
        }
        other => return Err(invalid(format!("spec.linux.seccomp: unknown operator {other:?}"))),
    }
    Ok(())
}

fn flag(name: &str) -> Result<u32> {
    Ok(match name {
        "SECCOMP_FILTER_FLAG_TSYNC" => 0, // one thread: nothing to synchronize
        "SECCOMP_FILTER_FLAG_LOG" => 2,
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => 4,
        other => return Err(invalid(format!("spec.linux.seccomp: flag {other:?} is not supported"))),
    })
}

/// Where a fixed-up JA goes.
#[derive(Clone, Copy)]
enum Target {
    Default,
    /// The chain of the i-th syscall number (in ascending order).
    Chain(usize),
}

/// Emits the search over `nrs` (ascending; the accumulator holds the syscall number),
/// whose first number is the `first`-th overall. A number whose chain is a single
/// rule without conditions returns right in the leaf; others jump to their chain.
fn emit_tree(
    nrs: &[u32],
    first: usize,
    chains: &BTreeMap<u32, Vec<(&[SyscallArg], u32)>>,
    out: &mut Vec<Insn>,
    fixups: &mut Vec<(usize, Target)>,
) {
    if nrs.len() <= LEAF {
        for (i, nr) in nrs.iter().enumerate() {
            out.push(Insn { code: JEQ_K, jt: 0, jf: 1, k: *nr });
            match chains[nr].as_slice() {
                [([], ret)] => out.push(stmt(RET_K, *ret)),
                _ => {
                    fixups.push((out.len(), Target::Chain(first + i)));
                    out.push(stmt(JA, 0));
                }
            }
        }
        fixups.push((out.len(), Target::Default));
        out.push(stmt(JA, 0));
        return;
    }
    let mid = nrs.len() / 2;
    // A >= nrs[mid]: take the JA to the right half; else skip it into the left half.
    out.push(Insn { code: JGE_K, jt: 0, jf: 1, k: nrs[mid] });
    let ja_right = out.len();
    out.push(stmt(JA, 0));
    emit_tree(&nrs[..mid], first, chains, out, fixups);
    out[ja_right].k = (out.len() - (ja_right + 1)) as u32;
    emit_tree(&nrs[mid..], first + mid, chains, out, fixups);
}

/// Compiles a profile.
pub fn compile(profile: &Seccomp) -> Result<Filter> {
    if let Some(key) = profile.extra.keys().find(|k| !profile.extra[k.as_str()].is_null() && *k != "listenerMetadata") {
        return Err(invalid(format!("spec.linux.seccomp.{key} is not supported")));
    }
    if profile.listener_path.as_deref().is_some_and(|p| !p.is_empty()) {
        return Err(invalid("spec.linux.seccomp.listenerPath: seccomp notify is not supported".into()));
    }
    let default = action(&profile.default_action, profile.default_errno_ret)?;
    let flags = profile.flags.iter().map(|f| flag(f)).try_fold(0u32, |acc, f| f.map(|f| acc | f))?;
    let enosys = RET_ERRNO | libc::ENOSYS as u32;
    let mut out = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        Insn { code: JEQ_K, jt: 1, jf: 0, k: AUDIT_ARCH_X86_64 },
        stmt(RET_K, enosys),
        stmt(LD_W_ABS, OFF_NR),
        Insn { code: JGE_K, jt: 0, jf: 1, k: X32_SYSCALL_BIT },
        stmt(RET_K, enosys),
    ];
    // Each number's rules in profile order, as (arg conditions, return value). An
    // entry without conditions always matches: nothing after it is reachable.
    let mut chains: BTreeMap<u32, Vec<(&[SyscallArg], u32)>> = BTreeMap::new();
    for (i, rule) in profile.syscalls.iter().enumerate() {
        if let Some(key) = rule.extra.keys().find(|k| !rule.extra[k.as_str()].is_null()) {
            return Err(invalid(format!("spec.linux.seccomp.syscalls[{i}].{key} is not supported")));
        }
        let ret = action(&rule.action, rule.errno_ret)?;
        for a in &rule.args {
            // Checked here so that a bad rule is refused even where unreachable.
            arg_check(&mut Block(Vec::new()), a)?;
        }
        for name in &rule.names {
            let Some(nr) = crate::syscalls::number(name) else { continue };
            let chain = chains.entry(nr).or_default();
            if chain.last().is_some_and(|(args, _)| args.is_empty()) {
                continue;
            }
            chain.push((&rule.args, ret));
        }
    }
    // The accumulator holds the syscall number here. The tree's jumps to a chain (or
    // to the default return) are JAs fixed up once the chains are laid out after it.
    let nrs: Vec<u32> = chains.keys().copied().collect();
    let mut fixups: Vec<(usize, Target)> = Vec::new();
    emit_tree(&nrs, 0, &chains, &mut out, &mut fixups);
    let default_at = out.len();
    out.push(stmt(RET_K, default));
    let mut chain_at = Vec::with_capacity(nrs.len());
    for nr in &nrs {
        chain_at.push(out.len());
        let chain = &chains[nr];
        for (args, ret) in chain {
            let mut b = Block(Vec::new());
            for a in args.iter() {
                arg_check(&mut b, a)?;
            }
            b.finish(*ret, &mut out)?;
        }
        if chain.last().is_some_and(|(args, _)| !args.is_empty()) {
            out.push(stmt(RET_K, default));
        }
    }
    for (at, target) in fixups {
        let to = match target {
            Target::Default => default_at,
            Target::Chain(i) => chain_at[i],
        };
        out[at].k = u32::try_from(to - (at + 1)).map_err(|_| invalid("spec.linux.seccomp is too long to compile".into()))?;
    }
    out.push(stmt(RET_K, default));
    if out.len() > MAX_INSNS {
        return Err(invalid(format!(
            "spec.linux.seccomp compiles to {} instructions, more than the kernel's {MAX_INSNS}",
            out.len()
        )));
    }
    Ok(Filter { insns: out.into_iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect(), flags })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::SyscallRule;

    /// Runs `prog` on one syscall like the kernel's classic BPF interpreter would.
    fn run(f: &Filter, arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let mut acc: u32 = 0;
        let mut pc = 0usize;
        loop {
            let (code, jt, jf, k) = f.insns[pc];
            pc += 1;
            let jump = |cond: bool| if cond { usize::from(jt) } else { usize::from(jf) };
            match code {
                LD_W_ABS => {
                    let k = k as usize;
                    acc = u32::from_le_bytes(data[k..k + 4].try_into().expect("4 bytes"));
                }
                AND_K => acc &= k,
                JEQ_K => pc += jump(acc == k),
                JGT_K => pc += jump(acc > k),
                JGE_K => pc += jump(acc >= k),
                JA => pc += k as usize,
                RET_K => return k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn rule(names: &[&str], action: &str, errno: Option<u32>, args: Vec<SyscallArg>) -> SyscallRule {
        SyscallRule {
            names: names.iter().map(|s| s.to_string()).collect(),
            action: action.into(),
            errno_ret: errno,
            args,
            ..Default::default()
        }
    }

    fn arg(index: u32, op: &str, value: u64, value_two: u64) -> SyscallArg {
        SyscallArg { index, value, value_two, op: op.into() }
    }

    const X86: u32 = AUDIT_ARCH_X86_64;

    #[test]
    fn first_matching_rule_wins_and_default_applies() {
        let nr = |n| crate::syscalls::number(n).expect("known syscall");
        let p = Seccomp {
            default_action: "SCMP_ACT_ERRNO".into(),
            syscalls: vec![
                rule(&["read", "write", "no_such_syscall_xyz"], "SCMP_ACT_ALLOW", None, vec![]),
                rule(&["personality"], "SCMP_ACT_ALLOW", None, vec![arg(0, "SCMP_CMP_EQ", 0xffff_ffff, 0)]),
                rule(&["mkdir"], "SCMP_ACT_ERRNO", Some(38), vec![]),
                rule(&["kill"], "SCMP_ACT_KILL_PROCESS", None, vec![]),
            ],
            ..Default::default()
        };
        let f = compile(&p).expect("compiles");
        assert_eq!(run(&f, X86, nr("read"), [0; 6]), RET_ALLOW);
        assert_eq!(run(&f, X86, nr("write"), [0; 6]), RET_ALLOW);
        assert_eq!(run(&f, X86, nr("open"), [0; 6]), RET_ERRNO | 1, "default ERRNO is EPERM");
        assert_eq!(run(&f, X86, nr("mkdir"), [0; 6]), RET_ERRNO | 38);
        assert_eq!(run(&f, X86, nr("kill"), [0; 6]), RET_KILL_PROCESS);
        assert_eq!(run(&f, X86, nr("personality"), [0xffff_ffff, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(run(&f, X86, nr("personality"), [8, 0, 0, 0, 0, 0]), RET_ERRNO | 1);
        assert_eq!(run(&f, X86, nr("personality"), [0x1_ffff_ffff, 0, 0, 0, 0, 0]), RET_ERRNO | 1);
        // Rules after an argument test still see the syscall number.
        assert_eq!(run(&f, X86, nr("mkdir"), [0xffff_ffff, 0, 0, 0, 0, 0]), RET_ERRNO | 38);
        // Other ABIs are refused.
        assert_eq!(run(&f, 0x4000_0003, nr("read"), [0; 6]), RET_ERRNO | 38);
        assert_eq!(run(&f, X86, X32_SYSCALL_BIT | nr("read"), [0; 6]), RET_ERRNO | 38);
    }

    #[test]
    fn every_operator_compares_64_bit_values() {
        type Holds = fn(u64, u64) -> bool;
        let ops: &[(&str, Holds)] = &[
            ("SCMP_CMP_EQ", |a, v| a == v),
            ("SCMP_CMP_NE", |a, v| a != v),
            ("SCMP_CMP_LT", |a, v| a < v),
            ("SCMP_CMP_LE", |a, v| a <= v),
            ("SCMP_CMP_GT", |a, v| a > v),
            ("SCMP_CMP_GE", |a, v| a >= v),
        ];
        let values = [0u64, 1, 5, 0xffff_ffff, 0x1_0000_0000, 0x1_0000_0005, 0x2_0000_0000, u64::MAX];
        for (op, holds) in ops {
            for &v in &values {
                let p = Seccomp {
                    default_action: "SCMP_ACT_ALLOW".into(),
                    syscalls: vec![rule(&["ioctl"], "SCMP_ACT_ERRNO", Some(7), vec![arg(2, op, v, 0)])],
                    ..Default::default()
                };
                let f = compile(&p).expect("compiles");
                for &a in &values {
                    let want = if holds(a, v) { RET_ERRNO | 7 } else { RET_ALLOW };
                    assert_eq!(run(&f, X86, 16, [0, 0, a, 0, 0, 0]), want, "{op} arg {a:#x} value {v:#x}");
                }
            }
        }
    }

    #[test]
    fn masked_eq_and_several_args() {
        let p = Seccomp {
            default_action: "SCMP_ACT_ALLOW".into(),
            syscalls: vec![rule(
                &["clone"],
                "SCMP_ACT_ERRNO",
                None,
                vec![arg(0, "SCMP_CMP_MASKED_EQ", 0x7e02_0000, 0x0002_0000), arg(1, "SCMP_CMP_EQ", 3, 0)],
            )],
            ..Default::default()
        };
        let f = compile(&p).expect("compiles");
        assert_eq!(run(&f, X86, 56, [0x0002_0011, 3, 0, 0, 0, 0]), RET_ERRNO | 1);
        assert_eq!(run(&f, X86, 56, [0x0002_0011, 4, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(run(&f, X86, 56, [0x1000_0011, 3, 0, 0, 0, 0]), RET_ALLOW);
    }

    #[test]
    fn bad_profiles_are_named() {
        let mut p = Seccomp { default_action: "SCMP_ACT_EXPLODE".into(), ..Default::default() };
        assert!(compile(&p).expect_err("bad default").to_string().contains("SCMP_ACT_EXPLODE"));
        p.default_action = "SCMP_ACT_ALLOW".into();
        p.syscalls = vec![rule(&["read"], "SCMP_ACT_NOTIFY", None, vec![])];
        assert!(compile(&p).expect_err("notify").to_string().contains("SCMP_ACT_NOTIFY"));
        p.syscalls = vec![rule(&["read"], "SCMP_ACT_ALLOW", None, vec![arg(0, "SCMP_CMP_ABOUT", 1, 0)])];
        assert!(compile(&p).expect_err("op").to_string().contains("SCMP_CMP_ABOUT"));
        p.syscalls = vec![rule(&["read"], "SCMP_ACT_ALLOW", None, vec![arg(6, "SCMP_CMP_EQ", 1, 0)])];
        assert!(compile(&p).expect_err("index").to_string().contains("index 6"));
        p.syscalls = vec![];
        p.flags = vec!["SECCOMP_FILTER_FLAG_NEW_LISTENER".into()];
        assert!(compile(&p).expect_err("flag").to_string().contains("NEW_LISTENER"));
    }

    #[test]
    fn a_docker_sized_profile_fits() {
        let names: Vec<&str> = crate::syscalls::SYSCALLS.iter().map(|(n, _)| *n).collect();
        let p = Seccomp {
            default_action: "SCMP_ACT_ERRNO".into(),
            syscalls: vec![rule(&names, "SCMP_ACT_ALLOW", None, vec![])],
            ..Default::default()
        };
        let f = compile(&p).expect("compiles");
        assert!(f.insns.len() < 1500, "{}", f.insns.len());
    }

    /// How many instructions the filter runs for one call.
    fn steps(f: &Filter, nr: u32) -> usize {
        let mut pc = 0usize;
        let mut acc = 0u32;
        for n in 1.. {
            let (code, jt, jf, k) = f.insns[pc];
            pc += 1;
            match code {
                LD_W_ABS if k == OFF_NR => acc = nr,
                LD_W_ABS => acc = AUDIT_ARCH_X86_64,
                JEQ_K => pc += usize::from(if acc == k { jt } else { jf }),
                JGE_K => pc += usize::from(if acc >= k { jt } else { jf }),
                JA => pc += k as usize,
                RET_K => return n,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
        unreachable!()
    }

    /// Every syscall number gets its own rule's answer through the search tree, and
    /// any call runs a few dozen instructions at most, not one test per rule.
    #[test]
    fn the_search_tree_finds_every_number_quickly() {
        let all: Vec<(&str, u32)> = crate::syscalls::SYSCALLS.to_vec();
        // Alternate answers, so that a wrong branch in the tree shows.
        let p = Seccomp {
            default_action: "SCMP_ACT_KILL_PROCESS".into(),
            syscalls: all
                .iter()
                .enumerate()
                .map(|(i, (n, _))| rule(&[n], "SCMP_ACT_ERRNO", Some(i as u32 + 1), vec![]))
                .collect(),
            ..Default::default()
        };
        let f = compile(&p).expect("compiles");
        for (i, (name, nr)) in all.iter().enumerate() {
            assert_eq!(run(&f, X86, *nr, [0; 6]), RET_ERRNO | (i as u32 + 1), "{name}");
            assert!(steps(&f, *nr) <= 40, "{name}: {} instructions", steps(&f, *nr));
        }
        // Numbers without a rule, below, between and above the known ones.
        for nr in [335, 336, 1000, 0x3fff_ffff] {
            assert_eq!(run(&f, X86, nr, [0; 6]), RET_KILL_PROCESS, "nr {nr}");
        }
        let only_high = Seccomp {
            default_action: "SCMP_ACT_ALLOW".into(),
            syscalls: vec![rule(&["futex_waitv"], "SCMP_ACT_ERRNO", None, vec![])],
            ..Default::default()
        };
        let f = compile(&only_high).expect("compiles");
        assert_eq!(run(&f, X86, 449, [0; 6]), RET_ERRNO | 1);
        assert_eq!(run(&f, X86, 0, [0; 6]), RET_ALLOW);
        let empty = Seccomp { default_action: "SCMP_ACT_LOG".into(), ..Default::default() };
        assert_eq!(run(&compile(&empty).expect("compiles"), X86, 0, [0; 6]), RET_LOG);
    }

    /// Several rules for one call: the first whose conditions hold wins, in profile
    /// order, whatever the rules' positions in the tree; an unconditional rule hides
    /// the ones after it.
    #[test]
    fn rules_for_one_call_keep_their_order() {
        let p = Seccomp {
            default_action: "SCMP_ACT_ALLOW".into(),
            syscalls: vec![
                rule(&["socket"], "SCMP_ACT_ALLOW", None, vec![arg(0, "SCMP_CMP_EQ", 1, 0)]),
                rule(&["read", "socket"], "SCMP_ACT_ERRNO", Some(3), vec![arg(0, "SCMP_CMP_EQ", 40, 0)]),
                rule(&["socket"], "SCMP_ACT_ERRNO", Some(97), vec![]),
                rule(&["socket"], "SCMP_ACT_ALLOW", None, vec![arg(0, "SCMP_CMP_EQ", 2, 0)]),
            ],
            ..Default::default()
        };
        let f = compile(&p).expect("compiles");
        let socket = crate::syscalls::number("socket").expect("socket");
        let read = crate::syscalls::number("read").expect("read");
        assert_eq!(run(&f, X86, socket, [1, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(run(&f, X86, socket, [40, 0, 0, 0, 0, 0]), RET_ERRNO | 3);
        assert_eq!(run(&f, X86, socket, [2, 0, 0, 0, 0, 0]), RET_ERRNO | 97, "the rule after the unconditional one is dead");
        assert_eq!(run(&f, X86, read, [40, 0, 0, 0, 0, 0]), RET_ERRNO | 3);
        assert_eq!(run(&f, X86, read, [41, 0, 0, 0, 0, 0]), RET_ALLOW, "no rule held: the default");
    }
}
