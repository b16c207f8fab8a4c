"""HFGD: high-level feature guided decoding (`hfgd`), its context encoders (`encoders`, with
CAR in `car`) and guided upsamplers (`upsamplers`)."""
