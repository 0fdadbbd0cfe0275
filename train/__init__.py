"""Training U-REPA / REPA / SiT from a cache with accelerate. Never loads a teacher."""
