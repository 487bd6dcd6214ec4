"""Old home of the converters (now ``llmhift.convert``): its modules keep the documented commands working."""
