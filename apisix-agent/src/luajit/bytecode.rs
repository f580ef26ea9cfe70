//! LuaJIT 2.1 bytecode facts needed to name functions the way LuaJIT's debug info does:
//! the opcode order and the role of each instruction's A operand, plus the decoder that
//! finds which global, field, method, upvalue or local a called function came from.

/// Role of operand A of an instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AMode {
    /// A is the destination slot.
    Dst,
    /// A is a base slot (calls, returns, loops): it clobbers A and everything above.
    Base,
    /// Anything else.
    Other,
}

use AMode::{Base, Dst, Other};

/// Opcodes of LuaJIT 2.1 in numbering order, with the mode of operand A.
pub const OPCODES: [(&str, AMode); 97] = [
    ("ISLT", Other),
    ("ISGE", Other),
    ("ISLE", Other),
    ("ISGT", Other),
    ("ISEQV", Other),
    ("ISNEV", Other),
    ("ISEQS", Other),
    ("ISNES", Other),
    ("ISEQN", Other),
    ("ISNEN", Other),
    ("ISEQP", Other),
    ("ISNEP", Other),
    ("ISTC", Dst),
    ("ISFC", Dst),
    ("IST", Other),
    ("ISF", Other),
    ("ISTYPE", Other),
    ("ISNUM", Other),
    ("MOV", Dst),
    ("NOT", Dst),
    ("UNM", Dst),
    ("LEN", Dst),
    ("ADDVN", Dst),
    ("SUBVN", Dst),
    ("MULVN", Dst),
    ("DIVVN", Dst),
    ("MODVN", Dst),
    ("ADDNV", Dst),
    ("SUBNV", Dst),
    ("MULNV", Dst),
    ("DIVNV", Dst),
    ("MODNV", Dst),
    ("ADDVV", Dst),
    ("SUBVV", Dst),
    ("MULVV", Dst),
    ("DIVVV", Dst),
    ("MODVV", Dst),
    ("POW", Dst),
    ("CAT", Dst),
    ("KSTR", Dst),
    ("KCDATA", Dst),
    ("KSHORT", Dst),
    ("KNUM", Dst),
    ("KPRI", Dst),
    ("KNIL", Base),
    ("UGET", Dst),
    ("USETV", Other),
    ("USETS", Other),
    ("USETN", Other),
    ("USETP", Other),
    ("UCLO", Other),
    ("FNEW", Dst),
    ("TNEW", Dst),
    ("TDUP", Dst),
    ("GGET", Dst),
    ("GSET", Other),
    ("TGETV", Dst),
    ("TGETS", Dst),
    ("TGETB", Dst),
    ("TGETR", Dst),
    ("TSETV", Other),
    ("TSETS", Other),
    ("TSETB", Other),
    ("TSETM", Base),
    ("TSETR", Other),
    ("CALLM", Base),
    ("CALL", Base),
    ("CALLMT", Base),
    ("CALLT", Base),
    ("ITERC", Base),
    ("ITERN", Base),
    ("VARG", Base),
    ("ISNEXT", Base),
    ("RETM", Base),
    ("RET", Other),
    ("RET0", Other),
    ("RET1", Other),
    ("FORI", Base),
    ("JFORI", Base),
    ("FORL", Base),
    ("IFORL", Base),
    ("JFORL", Base),
    ("ITERL", Base),
    ("IITERL", Base),
    ("JITERL", Base),
    ("LOOP", Other),
    ("ILOOP", Other),
    ("JLOOP", Other),
    ("JMP", Other),
    ("FUNCF", Other),
    ("IFUNCF", Other),
    ("JFUNCF", Other),
    ("FUNCV", Other),
    ("IFUNCV", Other),
    ("JFUNCV", Other),
    ("FUNCC", Other),
    ("FUNCCW", Other),
];

/// Opcode number by name (panics on a name not in [`OPCODES`]; used with literals only).
const fn op(name: &str) -> u8 {
    let mut i = 0;
    while i < OPCODES.len() {
        if const_eq(OPCODES[i].0, name) {
            return i as u8;
        }
        i += 1;
    }
    panic!("unknown opcode");
}

const fn const_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

pub const MOV: u8 = op("MOV");
pub const KNIL: u8 = op("KNIL");
pub const UGET: u8 = op("UGET");
pub const GGET: u8 = op("GGET");
pub const TGETS: u8 = op("TGETS");
pub const CALLM: u8 = op("CALLM");
pub const CALL: u8 = op("CALL");
pub const CALLMT: u8 = op("CALLMT");
pub const CALLT: u8 = op("CALLT");
pub const ITERC: u8 = op("ITERC");
pub const ITERN: u8 = op("ITERN");
/// The headers of C functions (`lua_CFunction`s and fast functions): what a C function's
/// `pc` points to.
pub const FUNCC: u8 = op("FUNCC");
pub const FUNCCW: u8 = op("FUNCCW");

/// Fields of one instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ins(pub u32);

impl Ins {
    pub fn op(self) -> u8 {
        (self.0 & 0xff) as u8
    }
    pub fn a(self) -> u32 {
        (self.0 >> 8) & 0xff
    }
    pub fn b(self) -> u32 {
        self.0 >> 24
    }
    pub fn c(self) -> u32 {
        (self.0 >> 16) & 0xff
    }
    pub fn d(self) -> u32 {
        self.0 >> 16
    }
    fn amode(self) -> AMode {
        OPCODES
            .get(usize::from(self.op()))
            .map(|(_, m)| *m)
            .unwrap_or(Other)
    }
    /// Whether this instruction calls a function held in slot A.
    pub fn is_call(self) -> bool {
        matches!(self.op(), CALLM | CALL | CALLMT | CALLT | ITERC | ITERN)
    }
}

/// Where a slot's value came from, as LuaJIT's `debug_slotname` finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotName {
    /// A global: `GGET`.
    Global(String),
    /// A field of the table in slot `table` at instruction `at`: `TGETS`.
    Field { name: String, table: u32, at: usize },
    /// A method: `TGETS` right after `MOV` of the object into the self slot.
    Method { name: String, table: u32, at: usize },
    /// An upvalue: `UGET`.
    Upvalue(String),
    /// A named local variable.
    Local(String),
}

/// Access to one prototype's debug data, as the naming code needs it.
pub trait ProtoView {
    /// Instruction at index `pc` (0 is the function header).
    fn ins(&self, pc: usize) -> Option<Ins>;
    /// String constant number `idx` (the D/C operand of GGET/TGETS).
    fn kstr(&self, idx: u32) -> Option<String>;
    /// Name of upvalue `idx`.
    fn uvname(&self, idx: u32) -> Option<String>;
    /// Name of the local in `slot` live at instruction `pc`.
    fn varname(&self, pc: usize, slot: u32) -> Option<String>;
    /// Whether the build uses two-slot frames (GC64): the self slot of a method call is A+2.
    fn fr2(&self) -> bool;
}

/// Finds the name of `slot` as of instruction `pc` by scanning backwards, bounded by `pc`.
pub fn slot_name(pt: &dyn ProtoView, mut pc: usize, mut slot: u32) -> Option<SlotName> {
    // Each restart follows a MOV to an earlier instruction, so `pc` strictly decreases.
    'restart: loop {
        if let Some(name) = pt.varname(pc, slot) {
            return Some(SlotName::Local(name));
        }
        let mut ip = pc;
        while ip > 1 {
            ip -= 1;
            let ins = pt.ins(ip)?;
            let ra = ins.a();
            match ins.amode() {
                Base if slot >= ra && (ins.op() != KNIL || slot <= ins.d()) => return None,
                Dst if ra == slot => match ins.op() {
                    MOV => {
                        slot = ins.d();
                        pc = ip;
                        continue 'restart;
                    }
                    GGET => return pt.kstr(ins.d()).map(SlotName::Global),
                    TGETS => {
                        let name = pt.kstr(ins.c())?;
                        let table = ins.b();
                        if ip > 1
                            && let Some(prev) = pt.ins(ip - 1)
                            && prev.op() == MOV
                            && prev.a() == ra + 1 + u32::from(pt.fr2())
                            && prev.d() == table
                        {
                            return Some(SlotName::Method {
                                name,
                                table,
                                at: ip,
                            });
                        }
                        return Some(SlotName::Field {
                            name,
                            table,
                            at: ip,
                        });
                    }
                    UGET => return pt.uvname(ins.d()).map(SlotName::Upvalue),
                    _ => return None,
                },
                _ => {}
            }
        }
        return None;
    }
}

/// The function name for a call at instruction `call_pc` of `pt`, formatted like
/// `burn`, `_M.access` or `router:match`; `None` if the call site does not tell.
pub fn call_name(pt: &dyn ProtoView, call_pc: usize) -> Option<String> {
    let ins = pt.ins(call_pc)?;
    if !ins.is_call() {
        return None;
    }
    let slot = if ins.op() == ITERC {
        ins.a().checked_sub(3)?
    } else {
        ins.a()
    };
    let simple = |n: SlotName| match n {
        SlotName::Global(s) | SlotName::Upvalue(s) | SlotName::Local(s) => Some(s),
        SlotName::Field { name, .. } | SlotName::Method { name, .. } => Some(name),
    };
    match slot_name(pt, call_pc, slot)? {
        SlotName::Field { name, table, at } => {
            Some(match slot_name(pt, at, table).and_then(simple) {
                Some(t) => format!("{t}.{name}"),
                None => name,
            })
        }
        SlotName::Method { name, table, at } => {
            Some(match slot_name(pt, at, table).and_then(simple) {
                Some(t) => format!("{t}:{name}"),
                None => format!(":{name}"),
            })
        }
        other => simple(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ins(op: u8, a: u32, d: u32) -> Ins {
        Ins(u32::from(op) | (a << 8) | (d << 16))
    }
    fn ins_abc(op: u8, a: u32, b: u32, c: u32) -> Ins {
        Ins(u32::from(op) | (a << 8) | (c << 16) | (b << 24))
    }

    struct Fake {
        code: Vec<Ins>,
        k: Vec<&'static str>,
        uv: Vec<&'static str>,
        locals: Vec<(u32, &'static str)>,
    }
    impl ProtoView for Fake {
        fn ins(&self, pc: usize) -> Option<Ins> {
            self.code.get(pc).copied()
        }
        fn kstr(&self, idx: u32) -> Option<String> {
            self.k.get(idx as usize).map(|s| s.to_string())
        }
        fn uvname(&self, idx: u32) -> Option<String> {
            self.uv.get(idx as usize).map(|s| s.to_string())
        }
        fn varname(&self, _pc: usize, slot: u32) -> Option<String> {
            self.locals
                .iter()
                .find(|(s, _)| *s == slot)
                .map(|(_, n)| n.to_string())
        }
        fn fr2(&self) -> bool {
            true
        }
    }

    #[test]
    fn opcode_numbers_match_luajit_2_1() {
        assert_eq!(MOV, 18);
        assert_eq!(KNIL, 44);
        assert_eq!(UGET, 45);
        assert_eq!(GGET, 54);
        assert_eq!(TGETS, 57);
        assert_eq!(CALLM, 65);
        assert_eq!(CALL, 66);
        assert_eq!(ITERC, 69);
        assert_eq!(OPCODES[96].0, "FUNCCW");
    }

    #[test]
    fn global_call() {
        let f = Fake {
            code: vec![ins(op("FUNCF"), 0, 0), ins(GGET, 0, 0), ins(CALL, 0, 1)],
            k: vec!["burn_a"],
            uv: vec![],
            locals: vec![],
        };
        assert_eq!(call_name(&f, 2).as_deref(), Some("burn_a"));
    }

    #[test]
    fn field_of_upvalue_table() {
        // local _M = ...; function f() _M.access() end
        let f = Fake {
            code: vec![
                ins(op("FUNCF"), 0, 0),
                ins(UGET, 0, 0),
                ins_abc(TGETS, 0, 0, 0),
                ins(CALL, 0, 1),
            ],
            k: vec!["access"],
            uv: vec!["_M"],
            locals: vec![],
        };
        assert_eq!(call_name(&f, 3).as_deref(), Some("_M.access"));
    }

    #[test]
    fn method_call_on_local() {
        // router:match(x) with router a local in slot 5 (GC64: self goes to A+2)
        let f = Fake {
            code: vec![
                ins(op("FUNCF"), 0, 0),
                ins(MOV, 2, 5),
                ins_abc(TGETS, 0, 5, 0),
                ins(CALL, 0, 2),
            ],
            k: vec!["match"],
            uv: vec![],
            locals: vec![(5, "router")],
        };
        assert_eq!(call_name(&f, 3).as_deref(), Some("router:match"));
    }

    #[test]
    fn unknown_origin_is_none() {
        let f = Fake {
            code: vec![
                ins(op("FUNCF"), 0, 0),
                ins(op("KPRI"), 0, 0),
                ins(CALL, 0, 1),
            ],
            k: vec![],
            uv: vec![],
            locals: vec![],
        };
        assert_eq!(call_name(&f, 2), None);
        assert_eq!(call_name(&f, 1), None, "not a call");
        assert_eq!(call_name(&f, 99), None, "out of range");
    }
}
