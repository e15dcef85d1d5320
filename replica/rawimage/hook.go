package rawimage

// Op names what a Hook is told about.
type Op uint8

const (
	OpRead  Op = iota + 1 // ReadAt
	OpWrite               // WriteAt
	OpTrim                // Trim
	OpZero                // Zero
	OpSync                // Sync (fdatasync)
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpTrim:
		return "trim"
	case OpZero:
		return "zero"
	case OpSync:
		return "sync"
	}
	return "op?"
}

// Hook sees every operation on the image before it reaches the file: the
// chaos tests' fault layer under the image (chaos/imagefault). Production
// images have none.
type Hook interface {
	// Before is called before op on [off, off+length) (zero for OpSync)
	// reaches the file, under the range lock the operation takes: a change
	// holds its range exclusively, so the hook may read what is there
	// before it changes. An error fails the operation with the file
	// untouched.
	Before(op Op, off, length uint64) error
	// Synced is called after an fdatasync succeeded.
	Synced()
}
