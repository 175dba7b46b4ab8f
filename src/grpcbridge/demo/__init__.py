"""Todo example service used by the demo, tests and benchmarks."""

#: The longest todo text, in characters, the demos' Todo service accepts (the rule itself is
#: :func:`grpcbridge.demo.store.text_error`). Kept here, free of imports, so that the command
#: line can show it without loading protobuf.
MAX_TEXT_LENGTH = 500
