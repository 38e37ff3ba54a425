package registry

import (
	"errors"
	"fmt"
	"time"

	"github.com/spf13/pflag"
)

// A plugin's Config reads a zero field as its default, so a flag bound to
// such a field must not let the command line set it to zero: that would
// quietly mean the default rather than what was typed. These flag kinds
// refuse it when the command line is parsed. They print in --help as the
// plain string and duration flags do.

// NonEmptyStringVar defines a string flag, as fs.StringVar does, that
// refuses an empty value.
func NonEmptyStringVar(fs *pflag.FlagSet, p *string, name, value, usage string) {
	*p = value
	fs.Var((*nonEmptyString)(p), name, usage)
}

// PositiveDurationVar defines a duration flag, as fs.DurationVar does, that
// refuses zero and negative values.
func PositiveDurationVar(fs *pflag.FlagSet, p *time.Duration, name string, value time.Duration, usage string) {
	*p = value
	fs.Var((*positiveDuration)(p), name, usage)
}

type nonEmptyString string

func (s *nonEmptyString) String() string { return string(*s) }
func (s *nonEmptyString) Type() string   { return "string" }
func (s *nonEmptyString) Set(v string) error {
	if v == "" {
		return errors.New("must not be empty")
	}
	*s = nonEmptyString(v)
	return nil
}

type positiveDuration time.Duration

func (d *positiveDuration) String() string { return time.Duration(*d).String() }
func (d *positiveDuration) Type() string   { return "duration" }
func (d *positiveDuration) Set(v string) error {
	x, err := time.ParseDuration(v)
	if err != nil {
		return err
	}
	if x <= 0 {
		return fmt.Errorf("must be positive, got %s", x)
	}
	*d = positiveDuration(x)
	return nil
}
