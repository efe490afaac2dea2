#!/usr/bin/env bash
# Full-length 44.1 kHz stereo MP3s for the preprocessing benchmark, made from the three real
# songs of Debian's asc-music (22.05 kHz originals, re-encoded at 192 kb/s), like FMA's files.
set -euo pipefail
out=${1:-bench-output/songs44k}
mkdir -p "$out"
for song in /usr/share/games/asc/music/*.mp3; do
  target="$out/$(basename "$song")"
  [ -f "$target" ] || ffmpeg -nostdin -hide_banner -loglevel error -i "$song" -ar 44100 -ac 2 \
      -b:a 192k "$target.tmp.mp3" && mv "$target.tmp.mp3" "$target" 2>/dev/null || true
done
echo "$out"
