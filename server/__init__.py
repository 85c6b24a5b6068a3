"""What serves strangers: launch settings, who may do what (access), and what their input may cost (limits)."""
