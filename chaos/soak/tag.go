package soak

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

// BlockSize is the unit of the workload: every operation covers whole
// blocks of this size. It is one page, so a block is read and written
// atomically by the servers (pread/pwrite) and a read names exactly one
// write, or finds a torn tag.
const BlockSize = 4096

// tagMagic opens every written block: "KEELSOAK".
const tagMagic = 0x4b45454c534f414b

// Value is what a block holds as the checker sees it: Zero (never written,
// trimmed or zeroed), the write of one writer's sequence number, or
// Corrupt (a torn or foreign tag: never legal).
type Value uint64

const (
	// Zero is a block of zeroes.
	Zero Value = 0
	// Corrupt is a block that is neither zeroes nor one whole tag of this
	// block: a torn write, a misplaced block, garbage.
	Corrupt Value = ^Value(0)
)

// MakeValue names the seq-th write of writer (both from 1).
func MakeValue(writer, seq uint32) Value { return Value(uint64(writer)<<32 | uint64(seq)) }

// Writer and Seq split a value made by MakeValue.
func (v Value) Writer() uint32 { return uint32(v >> 32) }
func (v Value) Seq() uint32    { return uint32(v) }

func (v Value) String() string {
	switch v {
	case Zero:
		return "0"
	case Corrupt:
		return "CORRUPT"
	}
	return fmt.Sprintf("w%d#%d", v.Writer(), v.Seq())
}

// Block layout of a tagged block (little endian):
//
//	0  u64 magic "KEELSOAK"
//	8  u64 value (writer<<32 | seq)
//	16 u64 block number
//	24 u32 CRC-32C of bytes 0..24 and 28..BlockSize
//	28 ...  a stream derived from value and block
const tagHeader = 28

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Fill writes v's tag for block blk into b (len BlockSize).
func Fill(b []byte, v Value, blk uint64) {
	binary.LittleEndian.PutUint64(b[0:], tagMagic)
	binary.LittleEndian.PutUint64(b[8:], uint64(v))
	binary.LittleEndian.PutUint64(b[16:], blk)
	x := uint64(v)*0x9e3779b97f4a7c15 ^ blk<<17 ^ 1
	for i := tagHeader; i < len(b); i += 4 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint32(b[i:], uint32(x))
	}
	binary.LittleEndian.PutUint32(b[24:], tagSum(b))
}

func tagSum(b []byte) uint32 {
	h := crc32.Update(0, castagnoli, b[:24])
	return crc32.Update(h, castagnoli, b[tagHeader:])
}

// Decode says which value block blk's bytes b hold: Zero, a write, or
// Corrupt when the tag is torn (checksum), misplaced (block) or not a tag.
func Decode(b []byte, blk uint64) Value {
	if binary.LittleEndian.Uint64(b) != tagMagic {
		for _, c := range b {
			if c != 0 {
				return Corrupt
			}
		}
		return Zero
	}
	v := Value(binary.LittleEndian.Uint64(b[8:]))
	if binary.LittleEndian.Uint64(b[16:]) != blk || binary.LittleEndian.Uint32(b[24:]) != tagSum(b) || v == Zero || v == Corrupt {
		return Corrupt
	}
	return v
}
