"""What LoHa and LoKr share (PEFT's LyCORIS base): the config fields in `config` (no torch), the
layer machinery in `layer`. Not a method itself: `loha/` and `lokr/` are."""
